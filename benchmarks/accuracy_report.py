"""The accuracy benchmark's report: ``accuracy.md`` and ``accuracy.png``.

The Markdown holds accuracy, speed, the ratios to the references, every run and the notes; the plot every run's
accuracy per model and accuracy against latency.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from benchmarks.protocol import DATASET_LABELS, DATASETS, MAIN_METRICS, METRICS, MODEL_LABELS


def write_markdown(summary: dict[str, Any], path: Path) -> None:
    """Write the human-readable report: accuracy, speed, ratios, per-run table and the protocol notes.

    Args:
        summary: Content of ``accuracy.json``.
        path: Target ``.md`` file.
    """
    protocol = summary["protocol"]
    machine_info = summary["machine"]
    speed = summary["speed"]
    lines = [
        "# GCAFlow accuracy and speed benchmark",
        "",
        f"Produced by `{shlex.join(summary['command'])}` (see COMMAND.md) at {summary['generated_at']}, "
        f"commit `{summary['versions']['git']}`, on {machine_info['cpu']} ({machine_info['cpus_usable']} usable "
        f"CPUs, {machine_info['torch_threads']} torch threads"
        + (f", {machine_info['gpu']}" if machine_info.get("gpu") else "")
        + f"), device `{protocol['device']}`.",
        "",
        "Protocol, the same for every model: backbone "
        f"`{protocol['backbone']}` (frozen, identical weights checked tensor by tensor in every model), input "
        f"{protocol['image_size']}x{protocol['image_size']}, {protocol['epochs']} training epochs (PatchCore: its one "
        f"memory-bank pass), batch {protocol['train_batch_size']} (test batch {protocol['eval_batch_size']}), metrics "
        "of the LAST epoch (no model selection on the test set), one evaluator. Accuracy figures are percentages, "
        "mean ± sample standard deviation over seeds.",
        "",
        "Grid: seeds from the rules `"
        + " ".join(f"--seeds {rule}" for rule in summary["grid"]["seed_rules"])
        + "` (later rules override earlier ones; a model without seeds on a data set was not run there); "
        f"PatchCore keeps {100 * protocol['patchcore_coreset_ratio']:g} % of its patches (anomalib's default: 10 %). "
        f"This invocation ran {summary['invocation']['runs_done']} runs and kept "
        f"{summary['invocation']['runs_kept']} from earlier ones in {summary['invocation']['seconds'] / 60:.1f} min.",
        "",
    ]
    for dataset, entries in summary["summary"].items():
        data = summary["data"].get(dataset, {})
        lines += [
            f"## Accuracy: {DATASET_LABELS[dataset]}",
            "",
            f"{data.get('train_images')} training images, {data.get('test_normal')} normal and "
            f"{data.get('test_anomalous')} anomalous test images"
            + (f"; subset: {data['subset']}" if data.get("subset") else "")
            + ".",
            "",
            "| model | seeds | image AUROC | pixel AUROC | PRO (AUPRO 30 %) | image F1 | train s/epoch |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {MODEL_LABELS[model]} | {len(entry['seeds'])} | "
            + " | ".join(_pct(entry[metric]) for metric in MAIN_METRICS)
            + f" | {_num(entry['train_s_per_epoch']['mean'], 1)} |"
            for model, entry in entries.items()
        ]
        lines.append("")
    if speed:
        lines += _speed_lines(speed)
    lines += _ratio_lines(summary)
    lines += [
        "## Every run",
        "",
        "| data set | model | seed | image AUROC | pixel AUROC | PRO | image F1 | pixel F1 | train s/epoch "
        "| test ms/image | CPU s (fit + test) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {DATASET_LABELS[run['dataset']]} | {MODEL_LABELS[run['model']]} | {run['seed']} | "
        + " | ".join(_num(_scaled(run["metrics"][metric]), 1) for metric in METRICS)
        + f" | {_num(run['timings']['train_s_per_epoch'], 1)} | {_num(run['timings']['test_ms_per_image'], 0)}"
        f" | {_num(run['timings']['cpu_s'], 0)} |"
        for run in summary["runs"]
    ]
    if summary.get("failed_runs"):
        lines += ["", "## Failed (missing from the tables above; rerunning the command retries them)", ""]
        lines += [f"- {f['model']} on {f['dataset']}, seed {f['seed']}: `{f['error']}`" for f in summary["failed_runs"]]
    lines += ["", *_notes(summary)]
    path.write_text("\n".join(lines) + "\n")


def _speed_lines(speed: dict[str, dict[str, Any]]) -> list[str]:
    """Write the speed section of the report.

    Args:
        speed: Speed record per model.

    Returns:
        list[str]: Markdown lines.
    """
    sizes = sorted({size for record in speed.values() for size in record.get("inference", {})}, key=int)
    first = next(iter(speed.values()))
    peak = first.get("machine_peak", {})
    header = ["model", "trainable params (M)", "size (MB)", "peak train memory (MB)"]
    for size in sizes:
        header += [
            f"latency b1 @{size} (ms)",
            f"throughput b16 @{size} (img/s)",
            f"GFLOP/img @{size}",
            f"GFLOP/s @{size}",
        ]
    lines = [
        "## Speed",
        "",
        f"Measured in the same process as the runs. Machine peak: {_num(peak.get('gflops'), 1)} GFLOP/s "
        f"({peak.get('description', 'dense matrix multiply')}). GFLOP/s = GFLOP per image x throughput at batch 16. "
        "Size: everything the model stores beyond the shared frozen backbone (fp32).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for model, record in speed.items():
        cells = [
            MODEL_LABELS[model],
            _num(record["trainable_params"] / 1e6, 3),
            _num(record["size_mb"], 1),
            _num(record.get("peak_train_memory_mb"), 0),
        ]
        for size in sizes:
            timing = record.get("inference", {}).get(size, {})
            cells += [
                _num(timing.get("latency_ms_b1"), 1),
                _num(timing.get("throughput_b16"), 1),
                _num(timing.get("gflop_per_image"), 2),
                _num(timing.get("achieved_gflops"), 1),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _ratio_lines(summary: dict[str, Any]) -> list[str]:
    """Write the sections relating every model to Fastflow and to the MSFlow-equivalent.

    Args:
        summary: Content of ``accuracy.json``.

    Returns:
        list[str]: Markdown lines.
    """
    lines: list[str] = []
    datasets = list(summary["summary"])
    speed_sizes = sorted({s for r in summary["speed"].values() for s in r.get("inference", {})}, key=int)
    for reference, against in summary["ratios"].items():
        header = ["model"]
        header += [f"Δ image AUROC {DATASET_LABELS[d]} (pt)" for d in datasets]
        header += [f"Δ pixel AUROC {DATASET_LABELS[d]} (pt)" for d in datasets]
        header += [f"train time/epoch {DATASET_LABELS[d]} (x)" for d in datasets]
        header += [f"latency b1 @{s} (x)" for s in speed_sizes] + [f"throughput b16 @{s} (x)" for s in speed_sizes]
        header += ["trainable params (x)", "size (x)"]
        lines += [
            f"## Relative to {MODEL_LABELS[reference]}",
            "",
            "Accuracy as differences in percentage points of the means; time, size and throughput as ratios "
            "(x 1.00 = the same; latency below 1 and throughput above 1 are faster).",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for model, entry in against.items():
            cells = [MODEL_LABELS[model]]
            cells += [_num(entry.get(d, {}).get("delta_image_AUROC_points"), 1, signed=True) for d in datasets]
            cells += [_num(entry.get(d, {}).get("delta_pixel_AUROC_points"), 1, signed=True) for d in datasets]
            cells += [_num(entry.get(d, {}).get("train_s_per_epoch_ratio"), 2) for d in datasets]
            ratios = entry.get("speed", {})
            cells += [_num(ratios.get(f"latency_b1_ratio@{s}"), 2) for s in speed_sizes]
            cells += [_num(ratios.get(f"throughput_b16_ratio@{s}"), 2) for s in speed_sizes]
            cells += [_num(ratios.get("trainable_params"), 2), _num(ratios.get("size_mb"), 2)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _notes(summary: dict[str, Any]) -> list[str]:
    """How every model was set up and what the figures mean.

    Args:
        summary: Content of ``accuracy.json``.

    Returns:
        list[str]: Markdown lines.
    """
    backbone = summary["backbone"] or {}
    stages = ", ".join(
        f"{layer} = `{info['module']}` ({info['channels']} ch, stride {info['stride']})"
        for layer, info in backbone.get("stages", {}).items()
    )
    return [
        "## Notes",
        "",
        f"- Backbone `{backbone.get('name')}`, weights sha256 `{backbone.get('weights_sha256_12')}…`, stages {stages}. "
        "GCAFlow variants and Fastflow use stride 4/8/16, Cflow its default stride 8/16/32, PatchCore stride 8/16.",
        "- Fastflow: anomalib only builds it on ResNet/transformer hub weights. It was constructed on a weightless "
        "ResNet-18, whose extractor was then replaced by the shared backbone; its LayerNorms and flow blocks were "
        "rebuilt for the new channels with anomalib's own `create_fast_flow_block` and Fastflow's hyper-parameters. "
        "Cflow and PatchCore load the shared weights from a timm `local-dir:` folder.",
        "- Metrics come from the weights after the last epoch. AUROC and PRO need no threshold; the F1 scores use "
        "anomalib's F1-adaptive threshold fitted on the validation split, which is the test set for both data sets "
        "(anomalib's MVTec default, applied to Magnetic Tile too): F1 is therefore optimistic, equally for every "
        "model.",
        "- PRO is anomalib's AUPRO: area under the per-region-overlap curve up to 30 % false-positive rate, "
        "normalised.",
        "- GCAFlow variants cache the training images' backbone features after the first epoch (its default "
        "`cache_features=True`; identical results); the anomalib models run as shipped. Train s/epoch is the time "
        "through the training batches (PatchCore: feature extraction; its coreset selection is outside it).",
        "- Cflow normalises its anomaly maps per test batch (anomalib's implementation), so its scores depend on "
        "the test batch size.",
    ]


def _pct(stats: dict[str, float | None]) -> str:
    """Format a fraction's mean +- std as percentages.

    Args:
        stats: ``{"mean", "std"}`` of fractions.

    Returns:
        str: E.g. ``"99.1 ± 0.4"``.
    """
    if stats["mean"] is None:
        return "-"
    text = f"{100 * stats['mean']:.1f}"
    return text if stats["std"] is None else f"{text} ± {100 * stats['std']:.1f}"


def _scaled(value: float | None) -> float | None:
    """Fraction to percent.

    Args:
        value: A fraction or ``None``.

    Returns:
        float | None: The percentage.
    """
    return None if value is None else 100 * value


def _num(value: float | None, digits: int, signed: bool = False) -> str:
    """Format a number for a table cell.

    Args:
        value: The number or ``None``.
        digits: Decimal places.
        signed: Always show the sign.

    Returns:
        str: The text (``-`` for ``None``).
    """
    if value is None:
        return "-"
    return f"{value:{'+' if signed else ''}.{digits}f}"


def write_plot(summary: dict[str, Any], path: Path) -> None:
    """Plot every run's accuracy per model (seeds as dots, mean +- std as bars) and accuracy against latency.

    Args:
        summary: Content of ``accuracy.json``.
        path: Target ``.png`` file.
    """
    datasets = list(summary["summary"])
    models = list(dict.fromkeys(model for entries in summary["summary"].values() for model in entries))
    colors = {dataset: color for dataset, color in zip(DATASETS, ("tab:blue", "tab:orange"), strict=True)}
    panels = (("image_AUROC", "image AUROC (%)"), ("pixel_AUROC", "pixel AUROC (%)"), ("PRO", "PRO, AUPRO 30 % (%)"))
    # The object-oriented API renders to a file without a display or a global pyplot state.
    figure = Figure(figsize=(14, 10), layout="tight")
    axes = figure.subplots(2, 2)
    offsets = np.linspace(-0.15, 0.15, len(datasets)) if len(datasets) > 1 else [0.0]
    for axis, (metric, label) in zip(axes.flat, panels, strict=False):
        for offset, dataset in zip(offsets, datasets, strict=True):
            label_pending = True
            for row, model in enumerate(models):
                values = [
                    100 * run["metrics"][metric]
                    for run in summary["runs"]
                    if run["dataset"] == dataset and run["model"] == model and run["metrics"][metric] is not None
                ]
                if not values:
                    continue
                y = row + offset
                axis.scatter(values, [y] * len(values), s=14, color=colors[dataset], alpha=0.45)
                spread = np.std(values, ddof=1) if len(values) > 1 else 0.0
                axis.errorbar(
                    np.mean(values),
                    y,
                    xerr=spread,
                    fmt="D",
                    color=colors[dataset],
                    ms=6,
                    capsize=3,
                    label=DATASET_LABELS[dataset] if label_pending else None,
                )
                label_pending = False
        axis.set_yticks(range(len(models)), [MODEL_LABELS[m] for m in models], fontsize=8)
        axis.invert_yaxis()
        axis.set_xlabel(label)
        axis.grid(axis="x", alpha=0.3)
        axis.legend(fontsize=8, loc="lower left")
    _plot_accuracy_vs_latency(axes.flat[3], summary, models, datasets, colors)
    figure.suptitle(
        f"{summary['protocol']['backbone']}, {summary['protocol']['image_size']}², {summary['protocol']['epochs']} "
        "epochs, last-epoch metrics (dots: seeds; diamonds: mean ± std)",
    )
    figure.savefig(path, dpi=110)


def _plot_accuracy_vs_latency(
    axis: Any,  # noqa: ANN401 - a matplotlib Axes
    summary: dict[str, Any],
    models: list[str],
    datasets: list[str],
    colors: dict[str, str],
) -> None:
    """Mean image AUROC against batch-1 latency at the smallest measured size, one point per model and data set.

    Args:
        axis: The matplotlib axes.
        summary: Content of ``accuracy.json``.
        models: Models in plotting order.
        datasets: Data sets of the grid.
        colors: Colour per data set.
    """
    speed = summary["speed"]
    sizes = sorted({s for r in speed.values() for s in r.get("inference", {})}, key=int)
    if not sizes:
        axis.text(0.5, 0.5, "speed not measured", ha="center", va="center", transform=axis.transAxes)
        axis.set_axis_off()
        return
    size = sizes[0]
    for dataset in datasets:
        for model in models:
            entry = summary["summary"][dataset].get(model)
            latency = speed.get(model, {}).get("inference", {}).get(size, {}).get("latency_ms_b1")
            if entry is None or latency is None or entry["image_AUROC"]["mean"] is None:
                continue
            axis.scatter(latency, 100 * entry["image_AUROC"]["mean"], color=colors[dataset])
            axis.annotate(
                model,
                (latency, 100 * entry["image_AUROC"]["mean"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    axis.set_xlabel(f"latency, batch 1, {size}² (ms)")
    axis.set_ylabel("mean image AUROC (%)")
    axis.set_title("accuracy against speed (colour: data set)", fontsize=10)
    axis.grid(alpha=0.3)
