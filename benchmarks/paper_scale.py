"""Speed of the flow at the paper's scale: WideResNet-50-2 features at 512x512, against the machine's own peak.

Run it from the repository root on an otherwise idle machine::

    OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 HF_HUB_OFFLINE=1 python -m benchmarks.paper_scale

It writes ``paper_scale.json`` and ``paper_scale.md`` into ``--output-dir`` (``benchmarks/results/paper_scale``).
The backbone has random weights (only its feature shapes matter for timing: 256/512/1024 channels at 64/32/16 px
after the 2x pooling). In the same run it measures:

* the peak per precision: the best of a large matmul and a dense 5x5 convolution (see ``rates.machine_peak_gflops``);
* for GCAFlow and the MSFlow-equivalent, in fp32 and in every lower precision this device computes natively (bf16
  on a CPU with avx512_bf16 or AMX and on a GPU, fp16 on a GPU): the training step (forward + NLL + backward) at
  batch 16, NCHW and channels-last, and inference at batch 1 and 16; FLOPs counted by ``torch.utils.flop_counter``
  (2 per multiply-add), achieved GFLOP/s and its fraction of the same precision's peak;
* the epoch a 209-image category costs once its features are cached: ``ceil(209 / 16)`` training steps plus as
  many Adam updates;
* with ``--compile``, ``torch.compile`` of the training step in two fresh processes sharing one inductor cache
  folder: the first pays the compilation, the second should find it on disk (one block per scale unless
  ``--compile-full-depth``: compile time grows with the number of blocks, the cached-to-cold ratio is the point).

``--retain-freed-memory`` runs it, the compile processes included, with the configs' ``RetainFreedMemory``: at this
scale glibc's default returns every step's gigabytes of activations to the kernel and the next step page-faults them
back (on an AMX Xeon with the setting: 857,000 faults in the first bf16 step, as the heap grows, none from the
fourth step on; five steps 12.7 to 6.1 s, against 17.3 to 8.2 s without it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from lightning.pytorch import seed_everything

from anomalib_gcaflow import GCAFlowModel
from anomalib_gcaflow.model.lightning_model import FUSED_ADAM_DEVICES
from anomalib_gcaflow.toolkit import retain_freed_memory
from benchmarks.environment import REPO_ROOT, environment, load_average, load_record
from benchmarks.rates import (
    PRECISION_DTYPES,
    flow_forward_rate,
    machine_peak_gflops,
    native_precisions,
    training_step,
)
from benchmarks.records import write_json
from benchmarks.speed_report import table
from benchmarks.timing import measure_seconds
from benchmarks.training_cost import rss_high_water_mb
from benchmarks.variants import VARIANTS

DEFAULT_OUTPUT_DIR = REPO_ROOT / "benchmarks" / "results" / "paper_scale"
BACKBONE = "wide_resnet50_2"
MODELS = ("gcaflow", "msflow_equiv")
CATEGORY_IMAGES = 209  # MVTec AD bottle's training set, the paper's example category
TARGET_FRACTION_OF_PEAK = 0.5


def build_model(name: str, device: str, quick: bool) -> GCAFlowModel:
    """The paper-scale network of a variant, with a randomly initialised backbone.

    Args:
        name (str): Variant id (``benchmarks.variants``).
        device (str): Device.
        quick (bool): One block per scale (a smoke run).

    Returns:
        GCAFlowModel: The model, in eval mode.
    """
    depths = {"depths": (1, 1, 1)} if quick else {}
    model = GCAFlowModel(backbone=BACKBONE, pre_trained=False, **VARIANTS[name].kwargs, **depths)
    return model.to(device).eval()


def optimizer_step_ms(model: GCAFlowModel, repeats: int) -> float:
    """Median milliseconds of one (fused) Adam update of the flow's parameters (memory-bound, no FLOPs counted).

    Args:
        model (GCAFlowModel): The model.
        repeats (int): Timed updates.

    Returns:
        float: Milliseconds.
    """
    parameters = list(model.flow.parameters())
    for parameter in parameters:
        parameter.grad = torch.full_like(parameter, 1e-6)
    fused = all(parameter.device.type in FUSED_ADAM_DEVICES for parameter in parameters) or None
    optimizer = torch.optim.Adam(parameters, lr=1e-12, fused=fused)  # as GCAFlow.configure_optimizers builds it
    seconds = measure_seconds(optimizer.step, repeats, 1, parameters[0].device)
    model.flow.zero_grad(set_to_none=True)
    return 1e3 * sorted(seconds)[len(seconds) // 2]


def model_rows(name: str, settings: argparse.Namespace, peaks: dict[str, float]) -> dict[str, Any]:
    """Every timing of one variant: training steps, inference, the Adam update and the projected epoch.

    Args:
        name (str): Variant id.
        settings (argparse.Namespace): From :func:`parse_args`.
        peaks (dict[str, float]): Peak GFLOP/s per precision, measured in this run.

    Returns:
        dict[str, Any]: ``flow_parameters_m``, ``rows`` (one per timing, each with ``fraction_of_peak`` and, for
        training, ``rss_high_water_mb``), ``adam_step_ms`` and ``epoch_seconds`` per precision.
    """
    model = build_model(name, settings.device, settings.quick)
    size, batch = settings.image_size, settings.batch_size
    rows = []
    for precision in native_precisions(settings.device):
        dtype = None if precision == "fp32" else PRECISION_DTYPES[precision]
        layouts = (False, True) if name == "gcaflow" else (False,)
        timed = [
            flow_forward_rate(
                model,
                size,
                batch,
                settings.train_repeats,
                dtype,
                channels_last=layout,
                train=True,
                ceiling_peak=peaks[precision] if settings.ceiling and not layout else None,
            )
            | {"rss_high_water_mb": rss_high_water_mb()}
            for layout in layouts
        ]
        timed += [
            flow_forward_rate(model, size, inference_batch, settings.repeats, dtype)
            for inference_batch in sorted({1, batch})
        ]
        rows += [row | {"precision": precision, "fraction_of_peak": row["gflops"] / peaks[precision]} for row in timed]
    adam_ms = optimizer_step_ms(model, settings.repeats)
    steps = math.ceil(CATEGORY_IMAGES / batch)
    epoch_seconds = {
        row["precision"] + (" channels-last" if row["channels_last"] else ""): steps
        * (row["ms_median"] + adam_ms)
        / 1e3
        for row in rows
        if row["mode"].startswith("train")
    }
    return {
        "flow_parameters_m": sum(p.numel() for p in model.flow.parameters()) / 1e6,
        "rows": rows,
        "adam_step_ms": adam_ms,
        "epoch_seconds": epoch_seconds,
    }


def compile_child(request: dict[str, Any]) -> None:
    """Body of one ``torch.compile`` process: time the first compiled training step and the steady one.

    Prints one JSON line: ``first_step_s`` (compilation included), ``steady_step_s``, ``eager_step_s`` (the same
    step without compilation, timed first) and ``cache_dir``.
    """
    torch.set_num_threads(request["threads"])
    if request["retain_freed_memory"]:
        retain_freed_memory()
    model = build_model("gcaflow", request["device"], request["quick"])
    size = request["image_size"]
    with torch.no_grad():
        features = model.extract_features(torch.randn(request["batch_size"], 3, *size, device=request["device"]))
    flow = torch.compile(model.flow, dynamic=False)
    model.flow.train()
    eager = min(measure_seconds(training_step(model.flow, features), 2, 1, request["device"]))
    step = training_step(model.flow, features, call=flow)
    first = measure_seconds(step, 1, 0, request["device"])[0]
    steady = min(measure_seconds(step, 2, 0, request["device"]))
    result = {
        "first_step_s": first,
        "steady_step_s": steady,
        "eager_step_s": eager,
        "cache_dir": os.environ["TORCHINDUCTOR_CACHE_DIR"],
    }
    print(json.dumps(result))


def compile_section(settings: argparse.Namespace) -> dict[str, Any]:
    """Compile the training step in two fresh processes that share one new inductor cache folder.

    Args:
        settings (argparse.Namespace): From :func:`parse_args`.

    Returns:
        dict[str, Any]: ``first_process`` and ``second_process`` results and the batch they ran at.
    """
    request = {
        "device": settings.device,
        "quick": settings.quick or not settings.compile_full_depth,
        "image_size": list(settings.image_size),
        "batch_size": settings.compile_batch_size,
        "threads": torch.get_num_threads(),
        "retain_freed_memory": settings.retain_freed_memory,
    }
    depths = "2, 5, 8" if settings.compile_full_depth and not settings.quick else "1, 1, 1"
    results: dict[str, Any] = {"batch_size": settings.compile_batch_size, "depths": depths}
    with tempfile.TemporaryDirectory(prefix="gcaflow-inductor-") as cache_dir:
        env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": cache_dir}
        for run in ("first_process", "second_process"):
            command = [sys.executable, "-m", "benchmarks.paper_scale", "--compile-child", json.dumps(request)]
            completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False, cwd=REPO_ROOT)
            if completed.returncode != 0:
                results[run] = f"failed (exit {completed.returncode}): {completed.stderr.strip()[-2000:]}"
                break
            results[run] = json.loads(completed.stdout.strip().splitlines()[-1])
    return results


def write_markdown(results: dict[str, Any], path: Path) -> None:
    """Write the results as Markdown tables.

    Args:
        results (dict[str, Any]): From :func:`run`.
        path (Path): Output file.
    """
    env = results["environment"]
    peak = results["machine_peak"]
    lines = [
        "# Paper-scale speed",
        "",
        f"Produced by `{results['command']}` at {results['started']}, on {env['cpu']} "
        f"(flags {', '.join(env['cpu_flags'])}; torch capability {env['torch_cpu_capability']}), "
        f"{env['torch_threads']} torch threads, device `{env['device']}`"
        + (f" ({env['gpu']})" if "gpu" in env else "")
        + f". Load average at start and end: {results['load']['start']} / {results['load']['end']}. "
        + (
            "Freed memory retained (`RetainFreedMemory`)."
            if results.get("freed_memory_retained")
            else "glibc's default allocator."
        ),
        "",
        f"Backbone `{BACKBONE}` (random weights), input {results['image_size'][0]}x{results['image_size'][1]}; "
        "flow GFLOP from `torch.utils.flop_counter` (2 per multiply-add; element-wise work not counted). "
        "'of peak' divides by the same precision's peak below.",
        "",
        "## Peak",
        "",
        f"{peak['description']}.",
        "",
    ]
    lines += table(["precision", "peak GFLOP/s"], list(peak["peak_by_precision"].items()))
    lines += ["## Flow", ""]
    rows = []
    for name, measured in results["models"].items():
        for row in measured["rows"]:
            rows.append([
                name,
                row["mode"],
                row["precision"],
                "yes" if row["channels_last"] else "no",
                row["batch_size"],
                row["gflop_per_batch"],
                row["ms_median"],
                row["gflops"],
                f"{100 * row['fraction_of_peak']:.0f} %",
                row.get("rss_high_water_mb", "-"),
            ])
    lines += table(
        ["model", "mode", "precision", "channels-last", "batch", "GFLOP", "ms", "GFLOP/s", "of peak", "RSS peak MB"],
        rows,
    )
    lines += _ceiling_lines(results)
    lines += [f"## Epoch of a {CATEGORY_IMAGES}-image category (features cached, Adam included)", ""]
    epoch_rows = [
        [name, measured["flow_parameters_m"], measured["adam_step_ms"], config, seconds]
        for name, measured in results["models"].items()
        for config, seconds in measured["epoch_seconds"].items()
    ]
    lines += table(["model", "flow params (M)", "Adam step ms", "precision", "s / epoch"], epoch_rows)
    if "compile" in results:
        compiled = results["compile"]
        lines += ["## torch.compile with its cache on disk", ""]
        compile_rows = [
            [run, *(value.values() if isinstance(value, dict) else [value])]
            for run, value in compiled.items()
            if run not in ("batch_size", "depths")
        ]
        header = [f"GCAFlow training step, batch {compiled['batch_size']}, depths {compiled['depths']}"]
        lines += table([*header, "first step s", "steady s", "eager s", "cache folder"], compile_rows)
    lines += ["## Targets", ""]
    lines += table(["target", "value", "limit", "met"], [list(target.values()) for target in results["targets"]])
    path.write_text("\n".join(lines))


def _ceiling_lines(results: dict[str, Any]) -> list[str]:
    """The convolutions and matrix products of each measured training step timed alone, and what the rest costs."""
    lines = []
    for name, measured in results["models"].items():
        for row in measured["rows"]:
            ceiling = row.get("conv_ceiling")
            if ceiling is None:
                continue
            lines += [
                f"## {name} training step, {row['precision']}: its convolutions and matrix products alone",
                "",
                f"Step {row['ms_median']:.0f} ms; its {sum(c['calls_per_step'] for c in ceiling['convolutions'])} "
                f"convolution and matrix-product calls alone {ceiling['conv_ms_per_step']:.0f} ms "
                f"({ceiling['conv_gflops']:.1f} GFLOP/s, "
                f"{100 * ceiling['conv_gflops'] / results['machine_peak']['peak_by_precision'][row['precision']]:.0f} "
                f"% of peak); everything else {row['non_conv_ms']:.0f} ms (a 'strided' input is replayed "
                "contiguous, so the copy it costs in the step counts as everything else). The 10 costliest:",
                "",
            ]
            keys = ["kind", "input_shape", "weight_shape", "layout", "calls_per_step", "gflop", "ms", "gflops"]
            cells = [
                [*(c[key] for key in keys), c["calls_per_step"] * c["ms"], f"{100 * c['fraction_of_peak']:.0f} %"]
                for c in ceiling["convolutions"][:10]
            ]
            lines += table([*keys[:-2], "ms per call", "GFLOP/s", "ms per step", "of peak"], cells)
    return lines


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's target: GCAFlow's batch-16 training step at >= 50 % of its precision's peak.

    Args:
        results (dict[str, Any]): From :func:`run`.

    Returns:
        list[dict[str, Any]]: One entry per precision: ``target``, ``value``, ``limit``, ``met``.
    """
    targets = []
    for row in results["models"]["gcaflow"]["rows"]:
        if row["mode"].startswith("train"):
            layout = "channels-last" if row["channels_last"] else "NCHW"
            value = row["fraction_of_peak"]
            targets.append({
                "target": f"GCAFlow training step, {row['precision']}, {layout}: fraction of peak",
                "value": round(value, 3),
                "limit": TARGET_FRACTION_OF_PEAK,
                "met": value >= TARGET_FRACTION_OF_PEAK,
            })
    return targets


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv (Sequence[str] | None, optional): Arguments; ``None`` reads ``sys.argv``. Defaults to ``None``.

    Returns:
        argparse.Namespace: The settings, with quick-mode sizes filled in.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 128 px, batch 2, one block per scale")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--repeats", type=int, default=3, help="timed inference calls (median reported)")
    parser.add_argument("--train-repeats", type=int, default=2, help="timed training steps (median reported)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile, first and cached")
    parser.add_argument(
        "--no-ceiling", dest="ceiling", action="store_false", help="skip timing the training steps' convolutions alone"
    )
    parser.add_argument(
        "--retain-freed-memory",
        action="store_true",
        help="keep freed memory in this process and the compile processes (anomalib_gcaflow.toolkit.RetainFreedMemory)",
    )
    parser.add_argument("--compile-batch-size", type=int, default=1)
    parser.add_argument(
        "--compile-full-depth",
        action="store_true",
        help="compile the paper's depths (2, 5, 8) instead of one block per scale (about 5x the compile time)",
    )
    parser.add_argument("--compile-child", help=argparse.SUPPRESS)
    settings = parser.parse_args(argv)
    settings.argv = list(sys.argv[1:] if argv is None else argv)
    if settings.repeats < 1 or settings.train_repeats < 1:
        parser.error("--repeats and --train-repeats must be >= 1")
    settings.image_size, settings.batch_size = ((128, 128), 2) if settings.quick else ((512, 512), 16)
    return settings


def run(settings: argparse.Namespace) -> dict[str, Any]:
    """Measure everything and write ``paper_scale.json`` and ``paper_scale.md``.

    Args:
        settings (argparse.Namespace): From :func:`parse_args`.

    Returns:
        dict[str, Any]: The results.

    Raises:
        ValueError: If ``--device cuda`` is given where torch sees no GPU.
    """
    if settings.device == "cuda" and not torch.cuda.is_available():
        msg = "--device cuda was given but torch sees no CUDA device; run on a GPU machine or use --device cpu"
        raise ValueError(msg)
    seed_everything(0, verbose=False)
    start_load = load_average()
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "benchmarks.paper_scale", *settings.argv]),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": settings.quick,
        "image_size": list(settings.image_size),
        "environment": environment(settings.device),
        "freed_memory_retained": settings.retain_freed_memory and retain_freed_memory(),
        "machine_peak": machine_peak_gflops(settings.device, settings.quick, settings.repeats),
    }
    peaks = results["machine_peak"]["peak_by_precision"]
    results["models"] = {name: model_rows(name, settings, peaks) for name in MODELS}
    if settings.compile:
        results["compile"] = compile_section(settings)
    results["seconds"] = time.perf_counter() - started
    results["load"] = load_record(start_load, load_average())
    results["targets"] = check_targets(results)
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(settings.output_dir / "paper_scale.json", results)
    write_markdown(results, settings.output_dir / "paper_scale.md")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark from the command line.

    Args:
        argv (Sequence[str] | None, optional): Arguments; ``None`` reads ``sys.argv``. Defaults to ``None``.
    """
    settings = parse_args(argv)
    if settings.compile_child is not None:
        compile_child(json.loads(settings.compile_child))
        return
    run(settings)


if __name__ == "__main__":
    main()
