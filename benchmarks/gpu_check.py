"""GPU check of GCAFlow's speed work, one prepared script of a few minutes for one H200-class GPU.

At 512x512 with the paper-size flow (WideResNet-50-2 channels 256/512/1024, random backbone weights: timing and
numerics only, no download), it checks and measures:

* bf16-autocast training steps of GCAFlow and the MSFlow-equivalent (and fp16 and fp32 ones of GCAFlow): loss
  finite, log-determinant and loss reduced in fp32, seconds per step, peak GPU memory;
* a short Lightning fit with ``precision="bf16-mixed"`` on generated images: the feature cache serves the second
  epoch and the loss stays finite;
* inference latency (batch 1) and throughput (batch 16) of both models in fp32 and bf16 autocast, with their
  FLOP ratio;
* optionally (``--compile``) the flow forward through ``torch.compile``.

It prints a JSON summary and writes it to ``$OUT/gpu_check.json`` (``--out`` overrides)::

    python -m benchmarks.gpu_check --device cuda [--compile]
    python -m benchmarks.gpu_check --device cpu --quick      # tiny smoke run of the same code on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from anomalib.data import Folder
from lightning.pytorch import Trainer, seed_everything
from PIL import Image

from anomalib_gcaflow import GCAFlow, GCAFlowModel
from anomalib_gcaflow.model.loss import GCAFlowLoss
from benchmarks.environment import environment
from benchmarks.flops import flow_gflop_per_image, model_gflop_per_image
from benchmarks.rates import autocast_context, flow_forward_rate, inference_timing, machine_peak_gflops
from benchmarks.timing import measure_seconds
from benchmarks.variants import VARIANTS

PAPER_BACKBONE = "wide_resnet50_2"
QUICK_BACKBONE = "resnet18"
MODELS = {name: dict(VARIANTS[name].kwargs) for name in ("gcaflow", "msflow_equiv")}


def _sizes(quick: bool) -> dict[str, Any]:
    """Sizes of a full check and of a CPU smoke run."""
    if quick:
        return {"backbone": QUICK_BACKBONE, "image_size": (64, 64), "batch": 2, "steps": 2, "depths": (1, 1, 1)}
    return {"backbone": PAPER_BACKBONE, "image_size": (512, 512), "batch": 16, "steps": 10, "depths": (2, 5, 8)}


def training_steps(
    kwargs: dict[str, Any],
    sizes: dict[str, Any],
    device: str,
    dtype: torch.dtype | None,
) -> dict[str, Any]:
    """Time raw training steps (backbone under no_grad, flow forward, NLL, backward, clipping, Adam).

    Args:
        kwargs (dict[str, Any]): :class:`GCAFlowModel` arguments over the check's sizes.
        sizes (dict[str, Any]): From :func:`_sizes`.
        device (str): ``"cuda"`` or ``"cpu"``.
        dtype (torch.dtype | None): Autocast dtype, ``None`` for fp32.

    Returns:
        dict[str, Any]: Seconds per step, losses, the reductions' dtypes and peak memory.
    """
    seed_everything(0, verbose=False)
    model = GCAFlowModel(backbone=sizes["backbone"], pre_trained=False, depths=sizes["depths"], **kwargs).to(device)
    model.train()
    optimizer = torch.optim.Adam(model.flow.parameters(), lr=1e-4)
    loss_function = GCAFlowLoss()
    images = torch.randn(sizes["batch"], 3, *sizes["image_size"], device=device)
    with torch.no_grad(), autocast_context(device, dtype):
        features = model.extract_features(images)
    losses: list[float] = []
    dtypes: dict[str, str] = {}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, dtype):
            latents, log_det = model(images, features=features)
            loss = loss_function(latents, log_det)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.flow.parameters(), 2.0)
        optimizer.step()
        losses.append(loss.item())
        dtypes.update(log_det=str(log_det.dtype), loss=str(loss.dtype), latent=str(latents[0].dtype))

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = measure_seconds(step, sizes["steps"], 1, device)
    return {
        "dtype": "fp32" if dtype is None else str(dtype),
        "step_s_median": statistics.median(seconds),
        "images_per_s": sizes["batch"] / statistics.median(seconds),
        "losses": losses,
        "loss_finite": all(np.isfinite(losses)),
        "reduction_dtypes": dtypes,
        "reductions_fp32": dtypes["log_det"] == dtypes["loss"] == "torch.float32",
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 1e6 if device == "cuda" else None,
        "trainable_params": sum(p.numel() for p in model.flow.parameters() if p.requires_grad),
    }


def lightning_fit(sizes: dict[str, Any], device: str, precision: str) -> dict[str, Any]:
    """Fit GCAFlow for two epochs through Lightning on generated images, with the feature cache on.

    Args:
        sizes (dict[str, Any]): From :func:`_sizes`.
        device (str): ``"cuda"`` or ``"cpu"``.
        precision (str): Lightning precision, e.g. ``"bf16-mixed"``.

    Returns:
        dict[str, Any]: Final loss, whether it is finite, cache hits and misses, seconds per epoch.
    """
    with tempfile.TemporaryDirectory(prefix="gcaflow-gpu-check-") as folder:
        root = Path(folder)
        rng = np.random.default_rng(0)
        for name, count in (("good", 2 * sizes["batch"] + 4), ("bad", 4)):
            (root / name).mkdir()
            for index in range(count):
                pixels = rng.integers(0, 256, (*sizes["image_size"], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / name / f"{index:03d}.png")
        datamodule = Folder(
            name="generated",
            root=root,
            normal_dir="good",
            abnormal_dir="bad",
            normal_split_ratio=0.1,
            train_batch_size=sizes["batch"],
            eval_batch_size=sizes["batch"],
            num_workers=0,
            seed=0,
        )
        seed_everything(0, verbose=False)
        model = GCAFlow(
            backbone=sizes["backbone"],
            pre_trained=False,
            image_size=sizes["image_size"],
            depths=sizes["depths"],
            max_epochs=2,
            warmup_epochs=0,
            evaluator=False,
            post_processor=False,
            visualizer=False,
        )
        trainer = Trainer(
            max_epochs=2,
            accelerator="gpu" if device == "cuda" else "cpu",
            devices=1,
            precision=precision,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
        )
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule)
        seconds = time.perf_counter() - start
    loss = float(trainer.callback_metrics["train_loss_epoch"])
    return {
        "precision": precision,
        "final_epoch_loss": loss,
        "loss_finite": bool(np.isfinite(loss)),
        "cache_hits": model.feature_cache.hits,
        "cache_misses": model.feature_cache.misses,
        "fit_s": seconds,
    }


def inference(sizes: dict[str, Any], device: str, low_precision: torch.dtype) -> dict[str, Any]:
    """Latency and throughput of GCAFlow and the MSFlow-equivalent, fp32 and autocast, with FLOP ratios.

    Args:
        sizes (dict[str, Any]): From :func:`_sizes`.
        device (str): ``"cuda"`` or ``"cpu"``.
        low_precision (torch.dtype): Autocast dtype compared with fp32.

    Returns:
        dict[str, Any]: Per model and dtype, batch-1 and batch-N timings; GFLOP per image; the ratios.
    """
    size, repeats = sizes["image_size"], 10 if device == "cuda" else 1
    results: dict[str, Any] = {}
    for name, kwargs in MODELS.items():
        model = GCAFlowModel(backbone=sizes["backbone"], pre_trained=False, depths=sizes["depths"], **kwargs)
        model = model.to(device).eval()
        results[name] = {
            "gflop_per_image": model_gflop_per_image(model, size),
            "flow_gflop_per_image": flow_gflop_per_image(model, size),
        }
        for dtype in (None, low_precision):
            key = "fp32" if dtype is None else str(dtype).removeprefix("torch.")
            results[name][key] = {
                "batch_1": inference_timing(model, size, 1, repeats, autocast_dtype=dtype),
                f"batch_{sizes['batch']}": inference_timing(model, size, sizes["batch"], repeats, autocast_dtype=dtype),
            }
        del model
    ours, theirs = results["gcaflow"], results["msflow_equiv"]
    flop_ratio = ours["gflop_per_image"] / theirs["gflop_per_image"]
    results["gcaflow_vs_msflow"] = {"flop_ratio": flop_ratio}
    for key in ("fp32", str(low_precision).removeprefix("torch.")):
        ratio = ours[key]["batch_1"]["latency_ms"] / theirs[key]["batch_1"]["latency_ms"]
        results["gcaflow_vs_msflow"][f"latency_ratio_batch_1_{key}"] = ratio
        results["gcaflow_vs_msflow"][f"overhead_beyond_flop_ratio_{key}"] = ratio / flop_ratio - 1
    return results


def compiled_flow(sizes: dict[str, Any], device: str, low_precision: torch.dtype) -> list[dict[str, Any]]:
    """Flow forward eager against ``torch.compile`` (compilation excluded from the timing).

    Args:
        sizes (dict[str, Any]): From :func:`_sizes`.
        device (str): ``"cuda"`` or ``"cpu"``.
        low_precision (torch.dtype): Autocast dtype.

    Returns:
        list[dict[str, Any]]: The eager and compiled rows of :func:`benchmarks.rates.flow_forward_rate`.
    """
    model = GCAFlowModel(backbone=sizes["backbone"], pre_trained=False, depths=sizes["depths"]).to(device).eval()
    arguments = (model, sizes["image_size"], sizes["batch"], 10 if device == "cuda" else 1, low_precision)
    return [flow_forward_rate(*arguments), flow_forward_rate(*arguments, compiled=True)]


def _guarded(results: dict[str, Any], name: str, function: Callable[[], Any]) -> None:
    """Run one check; a failure is recorded in the summary instead of losing the others' results."""
    start = time.perf_counter()
    try:
        results[name] = function()
    except Exception as exc:  # noqa: BLE001 - every failure must reach the summary
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    results["seconds"][name] = time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every check, print the JSON summary and write it to ``$OUT/gpu_check.json``.

    Args:
        argv (Sequence[str] | None, optional): Arguments; ``None`` reads ``sys.argv``. Defaults to ``None``.

    Returns:
        dict[str, Any]: The summary.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a resnet18-size flow (smoke run)")
    parser.add_argument("--compile", action="store_true", help="also time the flow through torch.compile")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="folder for the JSON")
    settings = parser.parse_args(argv)
    if settings.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was given but torch sees no CUDA device; use --device cpu --quick on a CPU")
    device, sizes = settings.device, _sizes(settings.quick)
    low_precision = torch.bfloat16
    results: dict[str, Any] = {
        # Schema 2: model ids from benchmarks.variants (schema 1, unversioned, called msflow_equiv msflow_equivalent).
        "schema": 2,
        "settings": {**vars(settings), "out": str(settings.out), **sizes},
        "seconds": {},
    }
    results["environment"] = environment(device)
    _guarded(results, "machine_peak", lambda: machine_peak_gflops(device, settings.quick))
    for name, kwargs in MODELS.items():
        _guarded(results, f"train_steps_{name}_bf16", lambda k=kwargs: training_steps(k, sizes, device, low_precision))
    _guarded(results, "train_steps_gcaflow_fp16", lambda: training_steps({}, sizes, device, torch.float16))
    _guarded(results, "train_steps_gcaflow_fp32", lambda: training_steps({}, sizes, device, None))
    _guarded(results, "lightning_fit_bf16_mixed", lambda: lightning_fit(sizes, device, "bf16-mixed"))
    _guarded(results, "inference", lambda: inference(sizes, device, low_precision))
    if settings.compile:
        _guarded(results, "compiled_flow", lambda: compiled_flow(sizes, device, low_precision))
    bf16_steps = [results[f"train_steps_{name}_bf16"] for name in MODELS]
    checks = {
        "bf16_losses_finite": all(steps.get("loss_finite", False) for steps in bf16_steps),
        "bf16_reductions_fp32": all(steps.get("reductions_fp32", False) for steps in bf16_steps),
        "fp16_loss_finite_reductions_fp32": all(
            results["train_steps_gcaflow_fp16"].get(key, False) for key in ("loss_finite", "reductions_fp32")
        ),
        "lightning_bf16_loss_finite": results["lightning_fit_bf16_mixed"].get("loss_finite", False),
        "lightning_cache_served_epoch_2": results["lightning_fit_bf16_mixed"].get("cache_hits", 0) > 0,
        "no_errors": not any(isinstance(value, dict) and "error" in value for value in results.values()),
    }
    results["checks"] = checks | {"all_passed": all(checks.values())}
    settings.out.mkdir(parents=True, exist_ok=True)
    (settings.out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
