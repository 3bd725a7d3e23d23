"""Training cost for the speed benchmarks: seconds per epoch and peak memory of one epoch on MVTec AD bottle.

The memory is measured in a fresh process (``python -m benchmarks.speed --memory-child``), so that nothing the
parent allocated counts.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
from collections.abc import Sequence
from importlib import import_module
from pathlib import Path
from typing import Any

import torch
from anomalib.data import MVTecAD
from anomalib.models.components import AnomalibModule
from lightning.pytorch import Callback, Trainer, seed_everything

from anomalib_gcaflow.toolkit import allocator
from benchmarks.environment import REPO_ROOT
from benchmarks.timing import EpochTimer

DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data" / "mvtec_ad"

BACKBONE = "tf_efficientnet_lite0"
MEMORY_RESULT_MARKER = "SPEED-MEMORY-RESULT "
# Lightning module factories by short name; any other name is an import path "package.module.Class".
MODEL_CLASSES = {"gcaflow": "anomalib_gcaflow.GCAFlow", "fastflow": "benchmarks.baselines.SharedBackboneFastflow"}


def build_module(
    model: str,
    model_kwargs: dict[str, Any],
    image_size: Sequence[int],
    quick: bool = False,
) -> AnomalibModule:
    """Build a Lightning module for timing: no evaluator, post-processor or visualizer.

    Args:
        model (str): ``"gcaflow"``, ``"fastflow"`` or an import path ``"package.module.Class"``.
        model_kwargs (dict[str, Any]): Arguments over the model's defaults (GCAFlow: over Lite0 weights, lr
            1e-3, no warm-up).
        image_size (Sequence[int]): ``(H, W)``: GCAFlow's ``image_size``, or the size given to the model's
            ``configure_pre_processor``.
        quick (bool, optional): One H-Flow block per scale (smoke runs). Defaults to ``False``.

    Returns:
        AnomalibModule: The module.
    """
    module_path, _, class_name = MODEL_CLASSES.get(model, model).rpartition(".")
    cls = getattr(import_module(module_path), class_name)
    kwargs: dict[str, Any] = {"evaluator": False, "post_processor": False, "visualizer": False}
    if model == "gcaflow":
        kwargs |= {"backbone": BACKBONE, "image_size": tuple(image_size), "lr": 1e-3, "warmup_epochs": 0}
        kwargs |= {"depths": (1, 1, 1)} if quick else {}
    else:
        kwargs["pre_processor"] = cls.configure_pre_processor(image_size=tuple(image_size))
    return cls(**kwargs | model_kwargs)


def _bottle(data_root: Path, batch_size: int, num_workers: int) -> MVTecAD:
    return MVTecAD(
        root=data_root,
        category="bottle",
        train_batch_size=batch_size,
        eval_batch_size=batch_size,
        num_workers=num_workers,
    )


def _trainer(epochs: int, device: str, max_batches: int | None, callbacks: list[Callback], precision: str) -> Trainer:
    return Trainer(
        max_epochs=epochs,
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=max_batches if max_batches is not None else 1.0,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def training_epoch_seconds(
    module: AnomalibModule,
    data_root: Path,
    batch_size: int = 16,
    epochs: int = 3,
    device: str = "cpu",
    num_workers: int = 0,
    max_batches: int | None = None,
    precision: str = "32-true",
) -> dict[str, Any]:
    """Train on MVTec AD bottle and time every epoch (validation off).

    Args:
        module (AnomalibModule): The model (see :func:`build_module`).
        data_root (Path): MVTec AD root holding ``bottle``.
        batch_size (int, optional): Training batch size. Defaults to 16.
        epochs (int, optional): Epochs; all but the first are summarised. Defaults to 3.
        device (str, optional): ``"cpu"`` or ``"cuda"``. Defaults to ``"cpu"``.
        num_workers (int, optional): Dataloader workers. Defaults to 0.
        max_batches (int | None, optional): Batches per epoch (``None``: all). Defaults to ``None``.
        precision (str, optional): Lightning precision. Defaults to ``"32-true"``.

    Returns:
        dict[str, Any]: ``epoch_s`` (each epoch), ``first_epoch_s``, ``later_epoch_s`` (median after the first)
        and the number of training images.
    """
    timer = EpochTimer(device)
    datamodule = _bottle(data_root, batch_size, num_workers)
    seed_everything(0, verbose=False)
    _trainer(epochs, device, max_batches, [timer], precision).fit(module, datamodule=datamodule)
    return {
        "epoch_s": timer.epoch_seconds,
        "first_epoch_s": timer.epoch_seconds[0],
        "later_epoch_s": statistics.median(timer.epoch_seconds[1:]) if len(timer.epoch_seconds) > 1 else None,
        "train_images": len(datamodule.train_data),
    }


def training_memory(
    model: str = "gcaflow",
    model_kwargs: dict[str, Any] | None = None,
    image_size: Sequence[int] = (512, 512),
    batch_size: int = 16,
    data_root: Path = DEFAULT_DATA_ROOT,
    max_batches: int | None = None,
    device: str = "cpu",
    quick: bool = False,
    retain_freed_memory: bool = False,
) -> dict[str, Any]:
    """Train one epoch on MVTec AD bottle in a fresh Python process and report its memory high-water marks.

    The child imports everything, builds the model (see :func:`build_module`) and fits one epoch with the
    default training settings (feature cache included), ``num_workers=0`` so that every byte is in one process.

    Args:
        model (str, optional): See :func:`build_module`. Defaults to ``"gcaflow"``.
        model_kwargs (dict[str, Any] | None, optional): Model arguments (JSON-serialisable). Defaults to ``None``.
        image_size (Sequence[int], optional): ``(H, W)``. Defaults to ``(512, 512)``.
        batch_size (int, optional): Training batch size. Defaults to 16.
        data_root (Path, optional): MVTec AD root holding ``bottle``. Defaults to the shared data folder.
        max_batches (int | None, optional): Batches to train (``None``: the whole epoch). Defaults to ``None``.
        device (str, optional): ``"cpu"`` or ``"cuda"``. Defaults to ``"cpu"``.
        quick (bool, optional): One H-Flow block per scale. Defaults to ``False``.
        retain_freed_memory (bool, optional): Apply ``anomalib_gcaflow.toolkit.retain_freed_memory`` in the child
            first. Defaults to ``False``.

    Returns:
        dict[str, Any]: ``peak_mb`` (CPU: RSS high-water mark of the process; CUDA: peak allocated GPU memory),
        ``rss_peak_mb``, ``rss_before_fit_mb`` (imports + model), ``cuda_peak_mb`` and the settings.

    Raises:
        RuntimeError: If the child process fails (its output is in the message).
    """
    request = {
        "model": model,
        "model_kwargs": model_kwargs or {},
        "image_size": list(image_size),
        "batch_size": batch_size,
        "data_root": str(data_root),
        "max_batches": max_batches,
        "device": device,
        "quick": quick,
        "threads": torch.get_num_threads(),
        "retain_freed_memory": retain_freed_memory,
    }
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed", "--memory-child", json.dumps(request)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith(MEMORY_RESULT_MARKER)]
    if result.returncode != 0 or not lines:
        msg = (
            f"memory measurement of {model} {model_kwargs} failed (exit {result.returncode}); its stderr ends with:\n"
            f"{result.stderr[-4000:]}"
        )
        raise RuntimeError(msg)
    return json.loads(lines[-1].removeprefix(MEMORY_RESULT_MARKER))


def peak_training_memory_mb(
    model: str = "gcaflow",
    model_kwargs: dict[str, Any] | None = None,
    image_size: Sequence[int] = (512, 512),
    batch_size: int = 16,
    data_root: Path = DEFAULT_DATA_ROOT,
    max_batches: int | None = None,
    device: str = "cpu",
) -> float:
    """Peak memory of training, measured in a fresh process (see :func:`training_memory` for the arguments).

    Args:
        model (str, optional): ``"gcaflow"``, ``"fastflow"`` or an import path of an ``AnomalibModule``.
            Defaults to ``"gcaflow"``.
        model_kwargs (dict[str, Any] | None, optional): Model arguments. Defaults to ``None``.
        image_size (Sequence[int], optional): ``(H, W)``. Defaults to ``(512, 512)``.
        batch_size (int, optional): Training batch size. Defaults to 16.
        data_root (Path, optional): MVTec AD root holding ``bottle``. Defaults to the shared data folder.
        max_batches (int | None, optional): Batches to train (``None``: one whole epoch). Defaults to ``None``.
        device (str, optional): ``"cpu"`` or ``"cuda"``. Defaults to ``"cpu"``.

    Returns:
        float: Megabytes (10^6 bytes): the process's RSS high-water mark on CPU, peak allocated memory on CUDA.
    """
    return training_memory(model, model_kwargs, image_size, batch_size, data_root, max_batches, device)["peak_mb"]


def rss_high_water_mb() -> float:
    """Return this process's resident-set high-water mark in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def memory_child(request: dict[str, Any]) -> None:
    """Body of the child process of :func:`training_memory`: train, then print the result line."""
    torch.set_num_threads(request["threads"])
    if request["retain_freed_memory"]:
        allocator.retain_freed_memory()
    device = request["device"]
    module = build_module(request["model"], request["model_kwargs"], request["image_size"], request["quick"])
    datamodule = _bottle(Path(request["data_root"]), request["batch_size"], num_workers=0)
    before_fit = rss_high_water_mb()
    _trainer(1, device, request["max_batches"], [], "32-true").fit(module, datamodule=datamodule)
    rss_peak = rss_high_water_mb()
    cuda_peak = torch.cuda.max_memory_allocated() / 1e6 if device == "cuda" else None
    result = {
        "model": request["model"],
        "model_kwargs": request["model_kwargs"],
        "image_size": request["image_size"],
        "batch_size": request["batch_size"],
        "max_batches": request["max_batches"],
        "peak_mb": cuda_peak if device == "cuda" else rss_peak,
        "rss_peak_mb": rss_peak,
        "rss_before_fit_mb": before_fit,
        "cuda_peak_mb": cuda_peak,
    }
    print(MEMORY_RESULT_MARKER + json.dumps(result), flush=True)  # the parent parses this line
