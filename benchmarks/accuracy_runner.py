"""The accuracy benchmark's grid: one run (train for the budget, test the last epoch) and the resumable grid."""

from __future__ import annotations

import gc
import logging
import os
import shlex
import tempfile
import time
import traceback
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

import numpy as np
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from benchmarks.accuracy_report import write_markdown, write_plot
from benchmarks.accuracy_speed import measure_all_speed
from benchmarks.accuracy_summary import summarise
from benchmarks.data import build_datamodule
from benchmarks.environment import machine, versions
from benchmarks.models import build_model
from benchmarks.protocol import DATASET_LABELS, METRICS, MODEL_LABELS, SCHEMA_VERSION, Settings, datasets_of, seeds_for
from benchmarks.records import mkdir, read_record, write_json
from benchmarks.shared_backbone import SharedBackbone
from benchmarks.timing import EpochTimer, cpu_seconds

# The accuracy benchmark's one logger, whatever module of it logs.
logger = logging.getLogger("benchmarks.accuracy")


def run_one(model_name: str, dataset: str, seed: int, settings: Settings, backbone: SharedBackbone) -> dict[str, Any]:
    """Train one model on one data set with one seed for the epoch budget, then test the last epoch's weights.

    Args:
        model_name: Model id.
        dataset: Data set id.
        seed: Seed of everything (weights initialisation, flow permutations, data order).
        settings: The invocation's settings.
        backbone: The shared backbone.

    Returns:
        dict[str, Any]: The run record.
    """
    protocol = settings.protocol
    seed_everything(seed, workers=True, verbose=False)
    datamodule, data = build_datamodule(dataset, settings)
    model, config = build_model(model_name, protocol, protocol.image_size, backbone)
    # PatchCore fixes its own single epoch; validation (thresholds, normalisation) runs once, after the last epoch.
    epochs = model.trainer_arguments.get("max_epochs", protocol.epochs)
    # Seconds from each training epoch's start to its last batch (validation runs inside the epoch, after it).
    stopwatch = EpochTimer(protocol.device)
    with tempfile.TemporaryDirectory(dir=mkdir(settings.work_dir / "engine")) as scratch:
        engine = Engine(
            default_root_dir=scratch,
            callbacks=[stopwatch],
            accelerator=protocol.device,
            devices=1,
            max_epochs=protocol.epochs,
            check_val_every_n_epoch=epochs,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        start, cpu_start = time.perf_counter(), cpu_seconds()
        engine.fit(model, datamodule=datamodule)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        results = engine.test(model, datamodule=datamodule, verbose=False)
        test_s = time.perf_counter() - start
        cpu_s = cpu_seconds() - cpu_start
    raw = {key: float(value) for key, value in results[0].items()}
    test_labels = datamodule.test_data.samples["label_index"].to_numpy()
    data.update(
        train_images=len(datamodule.train_data),
        test_normal=int((test_labels == 0).sum()),
        test_anomalous=int((test_labels == 1).sum()),
    )
    test_images = len(test_labels)
    return {
        "schema": SCHEMA_VERSION,
        "status": "ok",
        "model": model_name,
        "model_label": MODEL_LABELS[model_name],
        "config": config,
        "dataset": dataset,
        "dataset_label": DATASET_LABELS[dataset],
        "category": data.get("category", dataset),
        "data": data,
        "seed": seed,
        "protocol": asdict(protocol),
        "protocol_digest": protocol.digest(),
        "backbone": backbone.describe(),
        "metrics": {name: raw.get(key) for name, key in METRICS.items()},
        "metrics_raw": raw,
        "timings": {
            "epochs": len(stopwatch.epoch_seconds),
            "train_s_per_epoch": float(np.mean(stopwatch.epoch_seconds)),
            "train_epoch_s": stopwatch.epoch_seconds,
            "fit_s": fit_s,
            "test_s": test_s,
            "test_ms_per_image": 1000 * test_s / test_images,
            # CPU seconds of this process and its finished data-loader workers over fit and test: unlike wall
            # time, barely affected by other programs competing for the cores.
            "cpu_s": cpu_s,
        },
        "versions": versions(),
        "machine": machine(protocol.device),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": settings.argv,
    }


def run_grid(settings: Settings) -> dict[str, Any]:
    """Run (or resume) the whole grid and the speed measurements, then write every output.

    Args:
        settings: The invocation's settings.

    Returns:
        dict[str, Any]: The content of ``accuracy.json``.
    """
    start = time.perf_counter()
    out = mkdir(settings.out)
    mkdir(out / "runs")
    mkdir(settings.work_dir)
    write_command(settings)
    backbone = SharedBackbone(settings.protocol, settings.work_dir)
    records, failures, kept = [], [], 0
    speed = measure_all_speed(settings, backbone, failures) if settings.speed else {}
    jobs = [
        (dataset, model, seed)
        for dataset in datasets_of(settings)
        for model in settings.models
        for seed in seeds_for(settings.seeds, dataset, model)
    ]
    for index, (dataset, model, seed) in enumerate(jobs, start=1):
        path = out / "runs" / f"{dataset}__{model}__seed{seed}.json"
        failed = path.with_suffix(".failed.json")
        record = read_record(path, settings.protocol)
        if record is None:
            logger.warning("[%d/%d] %s on %s, seed %d", index, len(jobs), model, dataset, seed)
            try:
                record = run_one(model, dataset, seed, settings, backbone)
            except Exception as error:  # one broken run must not cost the rest of the grid
                logger.exception("%s on %s, seed %d failed; the grid goes on", model, dataset, seed)
                failures.append({"model": model, "dataset": dataset, "seed": seed, "error": repr(error)})
                write_json(failed, failures[-1] | {"traceback": traceback.format_exc()})
                continue
            finally:
                gc.collect()
            write_json(path, record)
            failed.unlink(missing_ok=True)
        else:
            logger.warning("[%d/%d] %s on %s, seed %d: done before, kept", index, len(jobs), model, dataset, seed)
            kept += 1
        records.append(record)
    summary = summarise(records, speed, settings)
    summary["failed_runs"] = failures
    summary["invocation"] = {
        "seconds": time.perf_counter() - start,
        "runs_done": len(records) - kept,
        "runs_kept": kept,
    }
    write_json(out / "accuracy.json", summary)
    write_markdown(summary, out / "accuracy.md")
    write_plot(summary, out / "accuracy.png")
    return summary


def write_command(settings: Settings) -> None:
    """Record the exact command line next to the results.

    Args:
        settings: The invocation's settings.
    """
    environment = " ".join(
        f"{key}={os.environ[key]}" for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if key in os.environ
    )
    command = (environment + " " if environment else "") + shlex.join(settings.argv)
    (settings.out / "COMMAND.md").write_text(
        "# Command that produced these results\n\n"
        "Run from the repository root (resumable: records already in `runs/` under the same protocol are kept):\n\n"
        f"```bash\n{command}\n```\n\n"
        f"Protocol digest `{settings.protocol.digest()}`; the protocol itself is in `accuracy.json`.\n",
    )
