"""One run of the convergence study and the protocol it runs under.

:class:`Study` is the study's protocol (the accuracy benchmark's :class:`~benchmarks.protocol.Protocol` plus what the
study adds); :func:`train_and_evaluate` trains one model (or fits a one-pass model) on the shared backbone,
evaluating its raw outputs after the listed epochs, then runs anomalib's own test.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from anomalib.engine import Engine
from anomalib.models.components import AnomalibModule
from lightning.pytorch import seed_everything

from anomalib_gcaflow import GCAFlow
from benchmarks.data import build_datamodule
from benchmarks.environment import cpu_flags, load_average, load_record, machine, versions
from benchmarks.models import instantiate, model_spec
from benchmarks.protocol import DATASET_LABELS, METRICS, MODEL_LABELS, Protocol
from benchmarks.protocol import Settings as AccuracySettings
from benchmarks.raw_eval import PRO_FPR_LIMIT, EpochEvaluation, measure
from benchmarks.records import mkdir
from benchmarks.shared_backbone import SharedBackbone
from benchmarks.timing import EpochTimer, TrainingClock
from benchmarks.variants import VARIANTS

SCHEMA_VERSION = 1
TRAINED = ("cflow", "fastflow")
ONE_PASS = ("patchcore", "padim")
# GCAFlow options that change the input pipeline or the shared backbone, not only the model.
PIPELINE_OPTIONS = ("image_size", "backbone")
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "32-true": None,
    "bf16-mixed": torch.bfloat16,
    "16-mixed": torch.float16,
}


@dataclass(frozen=True)
class Study:
    """The study's protocol: everything that must be identical for two records to be comparable.

    Args:
        base: The accuracy benchmark's protocol (its ``epochs`` is the budget N; its GCAFlow recipe fields hold
            GCAFlow's own defaults with ``gcaflow_args`` applied).
        eval_epochs: Epochs after which to evaluate (N included).
        per_budget: One run per budget in ``eval_epochs`` instead of one run evaluated along the way.
        gcaflow_args: GCAFlow options given on the command line, ``(key, JSON value)`` sorted by key.
        gcaflow_defaults: GCAFlow's own defaults at run time (JSON), so that a changed default is a new protocol.
        pro_fpr_limit: False-positive-rate limit of PRO.
        precision: Lightning precision of training and of the evaluations (``"32-true"``, ``"bf16-mixed"`` or
            ``"16-mixed"``).
    """

    base: Protocol
    eval_epochs: tuple[int, ...]
    per_budget: bool
    gcaflow_args: tuple[tuple[str, str], ...]
    gcaflow_defaults: str
    pro_fpr_limit: float = PRO_FPR_LIMIT
    precision: str = "32-true"

    def digest(self) -> str:
        """Short hash of the protocol, part of every record's file name.

        Returns:
            str: 12 hexadecimal characters.
        """
        fields = asdict(self)
        if fields["precision"] == "32-true":
            del fields["precision"]  # full precision hashes as before the field existed: its records stay valid
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of :attr:`precision` (``None`` for full precision).

        Returns:
            torch.dtype | None: The dtype.
        """
        return AUTOCAST_DTYPES[self.precision]

    def options(self) -> dict[str, Any]:
        """The command line's GCAFlow options.

        Returns:
            dict[str, Any]: Option -> value.
        """
        return {key: json.loads(value) for key, value in self.gcaflow_args}


@dataclass
class Settings:
    """One invocation.

    Args:
        study: The protocol.
        data: The accuracy benchmark's settings (data root, scratch folder, workers) that the data sets read.
        models: Model ids.
        datasets: Data set ids.
        seeds: ``--seeds`` rules (see :func:`benchmarks.protocol.seeds_for`).
        argv: The command line, recorded with the results.
    """

    study: Study
    data: AccuracySettings
    models: tuple[str, ...]
    datasets: tuple[str, ...]
    seeds: tuple[str, ...]
    argv: list[str]


def gcaflow_defaults() -> dict[str, Any]:
    """GCAFlow's constructor defaults that are plain values.

    Returns:
        dict[str, Any]: Option -> default.
    """
    defaults = {}
    for name, parameter in inspect.signature(GCAFlow.__init__).parameters.items():
        value = parameter.default
        if value is not inspect.Parameter.empty and isinstance(value, str | int | float | bool | tuple | list | None):
            defaults[name] = list(value) if isinstance(value, tuple) else value
    return defaults


def model_setup(name: str, study: Study, budget: int) -> tuple[Protocol, int]:
    """The protocol and input size one model runs under for one budget (GCAFlow variants may change both).

    Args:
        name: Model id.
        study: The protocol.
        budget: Epochs this run trains.

    Returns:
        tuple[Protocol, int]: Protocol and square input size.
    """
    protocol = replace(study.base, epochs=budget)
    if name not in VARIANTS:
        return protocol, protocol.image_size
    options = study.options()
    size = options.get("image_size", VARIANTS[name].image_size or protocol.image_size)
    if isinstance(size, list):
        if len(size) != 2 or size[0] != size[1]:
            msg = f"--gcaflow-args image_size={size}: give one square size (an integer or [S, S])."
            raise ValueError(msg)
        size = size[0]
    backbone = options.get("backbone", VARIANTS[name].backbone or protocol.backbone)
    weights = protocol.weights_path if backbone == protocol.backbone else None
    return replace(protocol, image_size=int(size), backbone=backbone, weights_path=weights), int(size)


def build(
    name: str, study: Study, budget: int, backbones: dict[str, SharedBackbone], work_dir: Path
) -> tuple[AnomalibModule, dict[str, Any], SharedBackbone]:
    """Build one model for one budget on the shared backbone, with the command line's GCAFlow options applied.

    Args:
        name: Model id.
        study: The protocol.
        budget: Epochs this run trains (GCAFlow's ``max_epochs``).
        backbones: Shared backbones by name, filled on first use.
        work_dir: Scratch folder.

    Returns:
        tuple[AnomalibModule, dict[str, Any], SharedBackbone]: Model, its description, its backbone.
    """
    protocol, size = model_setup(name, study, budget)
    if protocol.backbone not in backbones:
        backbones[protocol.backbone] = SharedBackbone(protocol, work_dir)
    backbone = backbones[protocol.backbone]
    class_path, kwargs = model_spec(name, protocol, size, backbone)
    if name in VARIANTS:
        kwargs |= {k: v for k, v in study.options().items() if k not in PIPELINE_OPTIONS}
    model, config = instantiate(name, class_path, kwargs, protocol, size, backbone)
    return model, config | {"image_size": size}, backbone


def train_and_evaluate(
    name: str, dataset: str, seed: int, budget: int, eval_epochs: Sequence[int], settings: Settings, backbones: dict
) -> tuple[dict[str, Any], AnomalibModule]:
    """Train one model (or fit a one-pass model), evaluating raw outputs after the listed epochs; then test.

    Args:
        name: Model id.
        dataset: Data set id.
        seed: Seed of everything.
        budget: Epochs to train (one-pass models: ignored, they fit in one).
        eval_epochs: Epochs after which to evaluate (one-pass models: after their fit).
        settings: The invocation's settings.
        backbones: Shared backbones by name.

    Returns:
        tuple[dict[str, Any], AnomalibModule]: The record and the trained model.
    """
    device = settings.study.base.device
    load_start, started = load_average(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    seed_everything(seed, workers=True, verbose=False)
    model, config, backbone = build(name, settings.study, budget, backbones, settings.data.work_dir)
    protocol, _ = model_setup(name, settings.study, budget)
    datamodule, data = build_datamodule(dataset, replace(settings.data, protocol=protocol))
    one_pass = name in ONE_PASS
    epochs = model.trainer_arguments.get("max_epochs", budget) if one_pass else budget
    clock, timer = TrainingClock(device), EpochTimer(device)
    evaluation = EpochEvaluation(
        [] if one_pass else eval_epochs, datamodule.test_dataloader, clock, settings.study.autocast_dtype()
    )
    with tempfile.TemporaryDirectory(dir=mkdir(settings.data.work_dir / "engine")) as scratch:
        engine = Engine(
            default_root_dir=scratch,
            callbacks=[timer, clock, evaluation],
            accelerator=device,
            devices=1,
            max_epochs=epochs,
            precision=settings.study.precision,
            # anomalib's thresholds and normalisation are fitted once, for its own test after the last epoch.
            check_val_every_n_epoch=epochs,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        start = time.perf_counter()
        engine.fit(model, datamodule=datamodule)
        fit_s = time.perf_counter() - start
        if one_pass:
            train_s, train_cpu_s = clock.elapsed()
            evaluation.points.append(
                {"epoch": epochs, "train_s": train_s, "train_cpu_s": train_cpu_s}
                | measure(model, datamodule.test_dataloader(), settings.study.autocast_dtype())
            )
        start = time.perf_counter()
        tested = engine.test(model, datamodule=datamodule, verbose=False)[0]
        test_s = time.perf_counter() - start
    test_labels = datamodule.test_data.samples["label_index"].to_numpy()
    data.update(
        train_images=len(datamodule.train_data),
        test_normal=int((test_labels == 0).sum()),
        test_anomalous=int((test_labels == 1).sum()),
    )
    anomalib_raw = {key: float(value) for key, value in tested.items()}
    record = {
        "schema": SCHEMA_VERSION,
        "benchmark": "convergence",
        "status": "ok",
        "model": name,
        "model_label": MODEL_LABELS[name],
        "kind": "one_pass" if one_pass else ("per_budget" if settings.study.per_budget else "trajectory"),
        "budget": epochs,
        "config": config,
        "dataset": dataset,
        "dataset_label": DATASET_LABELS[dataset],
        "data": data,
        "seed": seed,
        "protocol": asdict(settings.study),
        "protocol_digest": settings.study.digest(),
        "backbone": backbone.describe(),
        "points": evaluation.points,
        "anomalib_test": {
            "note": "anomalib's Engine.test after the last epoch: scores post-processed (normalised, clamped).",
            "metrics": {metric: anomalib_raw.get(key) for metric, key in METRICS.items()},
            "raw": anomalib_raw,
        },
        "timings": {"epoch_s": timer.epoch_seconds, "fit_s": fit_s, "anomalib_test_s": test_s},
        "versions": versions(),
        "machine": machine(device) | {"cpu_flags": cpu_flags()},
        "load_average": load_record(load_start, load_average()),
        "started_at": started,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": settings.argv,
    }
    return record, model
