"""The convergence study's summary (mean +- sample std over seeds per model and epoch), table and plot."""

from __future__ import annotations

import shlex
from collections import defaultdict
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from benchmarks.protocol import DATASET_LABELS, MODEL_LABELS

METRICS = ("image_AUROC", "pixel_AUROC", "PRO")
TIMES = ("train_s", "train_cpu_s", "eval_s")


def _mean_std(values: list[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (``None`` for fewer than two values).

    Args:
        values: One value per seed.

    Returns:
        dict[str, float | None]: ``{"mean", "std"}``.
    """
    return {
        "mean": float(np.mean(values)) if values else None,
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
    }


def _breakdowns(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean +- std over seeds of the breakdowns (per defect type, per feature scale, per scoring) every seed has.

    Records written before these were measured lack them; a mix of old and new seeds gets none.

    Args:
        metrics: One point's metrics per seed.

    Returns:
        dict[str, Any]: ``image_AUROC_by_defect`` (type -> stats), ``image_AUROC_by_scale`` (stats per scale) and
        ``by_scoring`` (scoring -> metric -> stats), each only where every seed has it.
    """
    entry: dict[str, Any] = {}
    if all("image_AUROC_by_defect" in m for m in metrics):
        names = sorted(set().union(*(m["image_AUROC_by_defect"] for m in metrics)))
        entry["image_AUROC_by_defect"] = {
            name: _mean_std([m["image_AUROC_by_defect"][name] for m in metrics]) for name in names
        }
    if all("image_AUROC_by_scale" in m for m in metrics):
        entry["image_AUROC_by_scale"] = [
            _mean_std(list(values)) for values in zip(*(m["image_AUROC_by_scale"] for m in metrics), strict=True)
        ]
    if all("by_scoring" in m for m in metrics):
        names = [name for name in metrics[0]["by_scoring"] if all(name in m["by_scoring"] for m in metrics)]
        entry["by_scoring"] = {
            name: {metric: _mean_std([m["by_scoring"][name][metric] for m in metrics]) for metric in METRICS}
            for name in names
        }
    return entry


def summarise(records: list[dict[str, Any]], study: Any) -> dict[str, Any]:  # noqa: ANN401
    """Aggregate the records: per data set, model and evaluated epoch, mean +- std of metrics and times over seeds.

    Args:
        records: Run records of this protocol.
        study: The protocol (``benchmarks.convergence_run.Study``).

    Returns:
        dict[str, Any]: ``summary[dataset][model]`` = list of per-epoch entries, plus the protocol and every run.
    """
    grouped: dict[tuple[str, str, int], list[tuple[dict[str, Any], dict[str, Any]]]] = defaultdict(list)
    for record in records:
        for point in record["points"]:
            grouped[record["dataset"], record["model"], point["epoch"]].append((record, point))
    summary: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for (dataset, model, epoch), pairs in sorted(grouped.items()):
        entry: dict[str, Any] = {"epoch": epoch, "seeds": sorted(r["seed"] for r, _ in pairs)}
        entry |= {metric: _mean_std([p["metrics"][metric] for _, p in pairs]) for metric in METRICS}
        entry |= {time: _mean_std([p[time] for _, p in pairs]) for time in TIMES}
        entry |= _breakdowns([p["metrics"] for _, p in pairs])
        final = [r["anomalib_test"]["metrics"] for r, p in pairs if p["epoch"] == r["budget"]]
        entry["anomalib_test"] = {
            metric: _mean_std([f[metric] for f in final if f[metric] is not None]) for metric in METRICS
        }
        summary.setdefault(dataset, {}).setdefault(model, []).append(entry)
    return {
        "schema": 1,
        "benchmark": "convergence",
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "protocol": asdict(study),
        "protocol_digest": study.digest(),
        "data": {r["dataset"]: r["data"] for r in records},
        "summary": summary,
        "runs": [
            {
                key: r[key]
                for key in ("model", "dataset", "seed", "kind", "budget", "points", "anomalib_test", "timings")
            }
            | {"load_average": r["load_average"]}
            for r in records
        ],
    }


def _cell(stats: dict[str, float | None], scale: float = 100.0, digits: int = 1) -> str:
    """Format ``mean ± std`` (just the mean for one seed).

    Args:
        stats: ``{"mean", "std"}``.
        scale: Factor applied to both.
        digits: Decimals.

    Returns:
        str: The cell.
    """
    if stats["mean"] is None:
        return "-"
    text = f"{scale * stats['mean']:.{digits}f}"
    return text + (f" ± {scale * stats['std']:.{digits}f}" if stats["std"] is not None else "")


def _metric_cells(stats: dict[str, Any]) -> str:
    """The image AUROC, pixel AUROC and PRO cells of one table row, joined.

    Args:
        stats: Metric name -> ``{"mean", "std"}``.

    Returns:
        str: The cells.
    """
    return " | ".join(_cell(stats[metric]) for metric in METRICS)


def write_markdown(summary: dict[str, Any], path: Path) -> None:
    """Write the table: per data set, model and evaluated epoch.

    Args:
        summary: Content of ``convergence.json``.
        path: Target ``.md`` file.
    """
    base = summary["protocol"]["base"]
    machine, load = summary["machine"], summary["load_average"]
    lines = [
        "# Convergence study",
        "",
        f"Produced by `{shlex.join(summary['command'])}` at {summary['generated_at']}, commit "
        f"`{summary['versions']['git']}`, on {machine['cpu']} ({machine['cpus_usable']} usable CPUs, "
        f"{machine['torch_threads']} torch threads), device `{base['device']}`. Load average at the start "
        f"{load['start']}, at the end {load['end']}"
        + (
            " — the machine was shared, so wall-clock times are inflated; CPU times much less."
            if load["shared"]
            else "."
        )
        + f" Protocol digest `{summary['protocol_digest']}`.",
        "",
        f"Backbone `{base['backbone']}` shared by every model, input {base['image_size']}², batch "
        f"{base['train_batch_size']}, budget {base['epochs']} epochs "
        + ("(one run per budget). " if summary["protocol"]["per_budget"] else "(one run, evaluated along the way). ")
        + "Metrics in percent from the raw model outputs in float64, mean ± sample std over seeds; PRO = AUPRO up "
        f"to {summary['protocol']['pro_fpr_limit']:g} FPR. Training minutes exclude evaluation. 'anomalib' = "
        "image AUROC that anomalib's Engine.test reports after the last epoch (post-processed scores).",
        "",
    ]
    for dataset, models in summary["summary"].items():
        data = summary["data"].get(dataset, {})
        lines += [
            f"## {DATASET_LABELS[dataset]}",
            "",
            f"{data.get('train_images')} training images, {data.get('test_normal')} normal and "
            f"{data.get('test_anomalous')} anomalous test images.",
            "",
            "| model | epoch | seeds | image AUROC | pixel AUROC | PRO | train min | train CPU-min "
            "| anomalib image AUROC |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for model, entries in models.items():
            lines += [
                f"| {MODEL_LABELS[model]} | {e['epoch']} | {len(e['seeds'])} | {_metric_cells(e)}"
                f" | {_cell(e['train_s'], 1 / 60, 2)} | {_cell(e['train_cpu_s'], 1 / 60, 2)} | "
                f"{_cell(e['anomalib_test']['image_AUROC'])} |"
                for e in entries
            ]
        lines += ["", *_breakdown_table(models), *_scoring_table(models)]
    if summary["failed_runs"]:
        lines += ["## Failed (rerunning the command retries them)", ""]
        lines += [f"- {f['model']} on {f['dataset']}, seed {f['seed']}: `{f['error']}`" for f in summary["failed_runs"]]
    path.write_text("\n".join(lines) + "\n")


def _breakdown_table(models: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Markdown lines: image AUROC per defect type and per feature scale after each model's last evaluated epoch.

    Args:
        models: ``summary[dataset]``.

    Returns:
        list[str]: The table and its caption, or nothing when no model has the breakdowns.
    """
    last = {model: entries[-1] for model, entries in models.items() if "image_AUROC_by_defect" in entries[-1]}
    if not last:
        return []
    defects = sorted(set().union(*(e["image_AUROC_by_defect"] for e in last.values())))
    scales = max(len(e.get("image_AUROC_by_scale", [])) for e in last.values())
    missing = {"mean": None, "std": None}
    lines = [
        "Image AUROC after the last epoch, per defect type (its images against every normal test image) and of "
        "the image score each feature scale gives alone (GCAFlow's flows; scale 1 = finest).",
        "",
        "| model | epoch | " + " | ".join(defects + [f"scale {i + 1}" for i in range(scales)]) + " |",
        "|---|---|" + "---|" * (len(defects) + scales),
    ]
    for model, entry in last.items():
        by_scale = entry.get("image_AUROC_by_scale", [])
        cells = [_cell(entry["image_AUROC_by_defect"].get(name, missing)) for name in defects]
        cells += [_cell(by_scale[i]) if i < len(by_scale) else "-" for i in range(scales)]
        lines.append(f"| {MODEL_LABELS[model]} | {entry['epoch']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_plot(summary: dict[str, Any], path: Path) -> None:
    """Plot every metric against training CPU-minutes, and image AUROC against epochs, per data set.

    Args:
        summary: Content of ``convergence.json``.
        path: Target ``.png`` file.
    """
    datasets = list(summary["summary"])
    figure = Figure(figsize=(18, 4.2 * max(1, len(datasets))), layout="constrained")
    axes = figure.subplots(max(1, len(datasets)), 4, squeeze=False)
    for row, dataset in zip(axes, datasets, strict=False):
        for model, entries in summary["summary"][dataset].items():
            minutes = [e["train_cpu_s"]["mean"] / 60 for e in entries]
            epochs = [e["epoch"] for e in entries]
            style = {"marker": "o", "label": MODEL_LABELS[model], "linestyle": "-" if len(entries) > 1 else "none"}
            for axis, metric in zip(row[:3], METRICS, strict=True):
                axis.plot(minutes, [100 * e[metric]["mean"] for e in entries], **style)
            row[3].plot(epochs, [100 * e["image_AUROC"]["mean"] for e in entries], **style)
        for axis, metric in zip(row[:3], METRICS, strict=True):
            axis.set(xscale="log", xlabel="training CPU-minutes", ylabel=f"{metric} (%)")
        row[3].set(xscale="log", xlabel="training epochs", ylabel="image_AUROC (%)")
        row[0].set_title(DATASET_LABELS[dataset], loc="left")
        for axis in row:
            axis.grid(alpha=0.3)
            # A log axis spanning less than a decade labels its minor ticks too, and they overlap.
            axis.xaxis.set_minor_formatter(NullFormatter())
        row[3].legend(fontsize=7)
    figure.savefig(path, dpi=110)


def _scoring_table(models: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Markdown lines: each metric under each of GCAFlow's scorings after each model's last evaluated epoch.

    Args:
        models: ``summary[dataset]``.

    Returns:
        list[str]: The table and its caption, or nothing when no model has per-scoring metrics.
    """
    last = {model: entries[-1] for model, entries in models.items() if "by_scoring" in entries[-1]}
    if not last:
        return []
    lines = [
        "The same runs after the last epoch, scored each way GCAFlow offers (`image_score` for the image AUROC, "
        "`pixel_map` for pixel AUROC and PRO; both set to the scoring named), from the same latents.",
        "",
        "| model | epoch | scoring | image AUROC | pixel AUROC | PRO |",
        "|---|---|---|---|---|---|",
    ]
    for model, entry in last.items():
        lines += [
            f"| {MODEL_LABELS[model]} | {entry['epoch']} | {name} | {_metric_cells(stats)} |"
            for name, stats in entry["by_scoring"].items()
        ]
    return [*lines, ""]
