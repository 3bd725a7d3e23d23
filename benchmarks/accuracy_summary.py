"""The accuracy benchmark's summary: mean +- std per model and data set, and every model against the references."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

import numpy as np

from benchmarks.environment import machine, versions
from benchmarks.protocol import (
    ALL_MODELS,
    DATASETS,
    MAIN_METRICS,
    METRICS,
    SCHEMA_VERSION,
    Settings,
    datasets_of,
    seeds_for,
)

# Reference models of the ratio columns.
REFERENCES = ("fastflow", "msflow_equiv")


def summarise(records: list[dict[str, Any]], speed: dict[str, dict[str, Any]], settings: Settings) -> dict[str, Any]:
    """Aggregate the runs into mean +- std per model and data set, and relate every model to the references.

    Args:
        records: Run records of the grid.
        speed: Speed record per model.
        settings: The invocation's settings.

    Returns:
        dict[str, Any]: The content of ``accuracy.json``.
    """
    per_model: dict[str, dict[str, Any]] = {}
    for dataset in datasets_of(settings):
        for model in settings.models:
            runs = [r for r in records if r["dataset"] == dataset and r["model"] == model]
            if not runs:
                continue
            entry: dict[str, Any] = {"n": len(runs), "seeds": sorted(r["seed"] for r in runs)}
            for metric in METRICS:
                entry[metric] = _mean_std([r["metrics"][metric] for r in runs])
            entry["train_s_per_epoch"] = _mean_std([r["timings"]["train_s_per_epoch"] for r in runs])
            entry["test_ms_per_image"] = _mean_std([r["timings"]["test_ms_per_image"] for r in runs])
            per_model.setdefault(dataset, {})[model] = entry
    return {
        "schema": SCHEMA_VERSION,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": settings.argv,
        "protocol": asdict(settings.protocol),
        "protocol_digest": settings.protocol.digest(),
        "grid": {
            "models": list(settings.models),
            "seed_rules": list(settings.seeds),
            "seeds": {d: {m: list(seeds_for(settings.seeds, d, m)) for m in settings.models} for d in DATASETS},
        },
        "backbone": records[0]["backbone"] if records else None,
        "data": {r["dataset"]: r["data"] for r in records},
        "summary": per_model,
        "speed": speed,
        "ratios": _ratios(per_model, speed),
        "versions": versions(),
        "machine": machine(settings.protocol.device),
        "runs": [
            {key: r[key] for key in ("model", "dataset", "seed", "metrics")} | {"timings": r["timings"]}
            for r in records
        ],
    }


def _mean_std(values: Sequence[float | None]) -> dict[str, float | None]:
    """Mean and sample standard deviation (``None`` for fewer than two values).

    Args:
        values: One value per run.

    Returns:
        dict[str, float | None]: ``{"mean", "std"}``.
    """
    kept = [v for v in values if v is not None]
    if not kept:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(kept)), "std": float(np.std(kept, ddof=1)) if len(kept) > 1 else None}


# Speed-record figures given as ratios to the references (besides latency and throughput per input size).
_SPEED_RATIO_KEYS = ("trainable_params", "size_mb", "peak_train_memory_mb")


def _ratios(per_model: dict[str, dict[str, Any]], speed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every model against each reference: accuracy differences in points, time and size as ratios.

    Args:
        per_model: Summary per data set and model.
        speed: Speed record per model.

    Returns:
        dict[str, Any]: ``{reference: {model: {...}}}``; a reference absent from the grid is left out.
    """
    ratios: dict[str, Any] = {}
    for reference in REFERENCES:
        against: dict[str, Any] = {}
        present = {m for entries in per_model.values() for m in entries} | set(speed)
        for model in [m for m in ALL_MODELS if m in present and m != reference]:
            entry: dict[str, Any] = {}
            for dataset, entries in per_model.items():
                if model in entries and reference in entries:
                    ours, theirs = entries[model], entries[reference]
                    entry[dataset] = {
                        f"delta_{metric}_points": _difference(ours[metric]["mean"], theirs[metric]["mean"])
                        for metric in MAIN_METRICS
                    } | {
                        "train_s_per_epoch_ratio": _ratio(
                            ours["train_s_per_epoch"]["mean"], theirs["train_s_per_epoch"]["mean"]
                        )
                    }
            if model in speed and reference in speed:
                entry["speed"] = {
                    key: _ratio(speed[model].get(key), speed[reference].get(key)) for key in _SPEED_RATIO_KEYS
                }
                for size, timing in speed[model].get("inference", {}).items():
                    theirs = speed[reference].get("inference", {}).get(size, {})
                    entry["speed"][f"latency_b1_ratio@{size}"] = _ratio(
                        timing.get("latency_ms_b1"), theirs.get("latency_ms_b1")
                    )
                    entry["speed"][f"throughput_b16_ratio@{size}"] = _ratio(
                        timing.get("throughput_b16"),
                        theirs.get("throughput_b16"),
                    )
            if entry:
                against[model] = entry
        if against:
            ratios[reference] = against
    return ratios


def _difference(ours: float | None, theirs: float | None) -> float | None:
    """Difference of two fractions in percentage points.

    Args:
        ours: The model's value.
        theirs: The reference's value.

    Returns:
        float | None: ``100 * (ours - theirs)``, or ``None`` if either is missing.
    """
    return None if ours is None or theirs is None else 100 * (ours - theirs)


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    """Ratio of two positive figures.

    Args:
        ours: The model's value.
        theirs: The reference's value.

    Returns:
        float | None: ``ours / theirs``, or ``None`` if either is missing or the reference is zero.
    """
    return None if ours is None or not theirs else ours / theirs
