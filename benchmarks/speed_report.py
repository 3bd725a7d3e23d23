"""The speed benchmark's report, ``speed.md``: one Markdown table per section."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.training_cost import BACKBONE


def _number(value: Any, digits: int = 2) -> str:  # noqa: ANN401 - any JSON value
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Render a Markdown table (floats with 2 decimals), followed by a blank line.

    Args:
        header (Sequence[str]): Column titles.
        rows (Sequence[Sequence[Any]]): Cells, one sequence per row.

    Returns:
        list[str]: The lines.
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_number(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def write_markdown(results: dict[str, Any], path: Path) -> None:
    """Write the results as Markdown tables.

    Args:
        results (dict[str, Any]): The run's results (as in ``speed.json``).
        path (Path): Output file.
    """
    env = results["environment"]
    kind = "QUICK smoke run, numbers meaningless" if results["quick"] else "full run"
    gpu = f", GPU {env['gpu']}" if env.get("gpu") else ""
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items())
    lines = [
        "# GCAFlow speed benchmark",
        "",
        f"`{results['command']}` at {results['started']} ({kind}).",
        f"{env['cpu']} (flags {', '.join(env['cpu_flags'])}; torch CPU capability {env['torch_cpu_capability']}), "
        f"{env['torch_threads']} torch threads, {env['cpus_usable']} usable CPUs{gpu}; device {env['device']}; "
        f"backbone {BACKBONE}.",
        f"Versions: {versions}, python {env['python']}.",
        "Freed memory: "
        + (
            "retained in every measured process (RetainFreedMemory)."
            if results.get("freed_memory_retained")
            else "returned to the kernel as glibc does by default."
        ),
        "",
    ]
    if results["targets"]:
        lines += ["## Targets", ""]
        lines += table(["target", "value", "limit", "met"], [list(target.values()) for target in results["targets"]])
    peak = results["machine_peak"]
    lines += ["## Machine peak", "", f"{peak['description']}.", ""]
    lines += table(
        ["fp32 matmul GFLOP/s", "fp32 5x5 conv GFLOP/s", "peak GFLOP/s", "bf16 matmul GFLOP/s (reference)"],
        [[peak["matmul_fp32_gflops"], peak["conv5x5_fp32_gflops"], peak["gflops"], peak.get("matmul_bf16_gflops")]],
    )
    renderers = {
        "flow": _flow_lines,
        "latency": _latency_lines,
        "training_epoch": _training_lines,
        "peak_memory": _memory_lines,
    }
    for section, render in renderers.items():
        if isinstance(results.get(section), str):
            lines += [f"## {section}", "", results[section], ""]
        elif section in results:
            lines += render(results[section])
    path.write_text("\n".join(lines))


def _flow_lines(flow: dict[str, Any]) -> list[str]:
    flop = flow["gflop_per_image"]
    lines = [
        "## Flow forward (whole flow on precomputed features)",
        "",
        f"GFLOP per image (2 per multiply-add, steady state): flow {flop['flow_folded']:.3f} with folding, "
        f"{flop['flow_unfolded']:.3f} without; whole model {flop['whole_model']:.3f}.",
        "",
    ]
    header = ["mode", "dtype", "fold", "channels-last", "compiled", "size", "batch", "GFLOP/batch", "ms (median)"]
    keys = ["mode", "dtype", "fold_positional", "channels_last", "compiled", "image_size", "batch_size"]
    measured = ("gflop_per_batch", "ms_median", "gflops")
    rows = [[row[key] for key in (*keys, *measured)] for row in flow["rows"]]
    lines += table([*header, "GFLOP/s"], rows)
    deviation = flow["bf16_deviation"]
    lines += ["bf16 autocast against fp32 (same features, untrained flow, so a numerical check):", ""]
    lines += table(list(deviation), [list(deviation.values())])
    return lines


def _latency_lines(latency: dict[str, Any]) -> list[str]:
    lines = ["## Inference (backbone + flow + post-processing, inference_mode)", ""]
    batched = next(key for key in latency["rows"][0] if key.startswith("batch_") and key != "batch_1")
    rows = [
        [
            row["model"],
            row["image_size"][0],
            row["gflop_per_image"],
            row["flow_gflop_per_image"],
            row["batch_1"]["latency_ms"],
            row[batched]["latency_ms"],
            row[batched]["throughput"],
        ]
        for row in latency["rows"]
    ]
    header = ["model", "size", "GFLOP/image", "flow GFLOP/image", "batch-1 ms", f"{batched} ms", f"{batched} images/s"]
    lines += table(header, rows)
    keys = ["latency_ratio_batch_1", "flop_ratio", "flow_flop_ratio", "overhead_beyond_flop_ratio"]
    lines += ["GCAFlow / MSFlow-equivalent:", ""]
    ratios = [[row["image_size"][0], *(row[key] for key in keys)] for row in latency["gcaflow_vs_msflow"]]
    lines += table(["size", *keys], ratios)
    return lines


def _training_lines(training: dict[str, Any]) -> list[str]:
    lines = ["## Training seconds per epoch (MVTec AD bottle, validation off)", ""]
    rows = [
        [
            name,
            row["model"],
            json.dumps(row["model_kwargs"]),
            row.get("precision", "32-true"),
            row["train_images"],
            row["first_epoch_s"],
            row["later_epoch_s"],
            ", ".join(f"{seconds:.2f}" for seconds in row["epoch_s"]),
        ]
        for name, row in training.items()
    ]
    header = ["config", "model", "arguments", "precision", "images", "first epoch s", "later epochs s", "every epoch s"]
    lines += table(header, rows)
    return lines


def _memory_lines(memory: list[dict[str, Any]]) -> list[str]:
    lines = ["## Peak training memory (one epoch, fresh process per configuration)", ""]
    keys = ["config", "image_size", "batch_size", "peak_mb", "rss_before_fit_mb", "rss_peak_mb", "cuda_peak_mb"]
    lines += table(keys, [[row[key] for key in keys] for row in memory])
    return lines
