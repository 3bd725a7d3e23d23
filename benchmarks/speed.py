"""Speed benchmark of GCAFlow: one command, one run, every number in ``speed.json`` and ``speed.md``.

Run it from the repository root on an otherwise idle machine::

    OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 HF_HUB_OFFLINE=1 python -m benchmarks.speed

``--quick`` is a tiny smoke run (seconds, numbers meaningless); ``--device cuda`` measures on a GPU.

Everything is measured in the same run, on the same offline backbone (``tf_efficientnet_lite0``) and input size:

* the machine's peak: the best of torch's fp32 matrix multiply and a large dense 5x5 convolution (bf16 matmul
  for reference);
* FLOPs (``torch.utils.flop_counter``, 2 per multiply-add) and achieved GFLOP/s of the whole flow forward in
  fp32 (folded and unfolded positional encoding, NCHW and channels-last inputs), in bf16 autocast with its
  numerical deviation from fp32, optionally through ``torch.compile``, and of a training forward + backward;
* training seconds per epoch on real MVTec AD bottle, after the first epoch, for GCAFlow with and without the
  feature cache and the positional folding, the MSFlow-equivalent and anomalib's Fastflow;
* batch-1 latency and batch-16 throughput of GCAFlow and the MSFlow-equivalent with their FLOP ratio;
* the RSS high-water mark (CUDA: peak allocated memory) of one training epoch at 512x512, batch 16, each
  configuration in a fresh Python process.

``--retain-freed-memory`` runs every configuration, the fresh processes included, with the quick start's
``RetainFreedMemory`` (glibc keeps freed memory instead of returning it to the kernel); without it, with glibc's
default.

The measurements live in modules other benchmarks reuse: ``rates`` (machine peak, inference timing, flow
GFLOP/s), ``training_cost`` (epoch seconds, peak memory), ``flops``; ``speed_sections`` and ``speed_report`` hold
this benchmark's sections and its Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from lightning.pytorch import seed_everything

from anomalib_gcaflow.toolkit import retain_freed_memory
from benchmarks.environment import REPO_ROOT, environment
from benchmarks.rates import machine_peak_gflops
from benchmarks.records import write_json
from benchmarks.speed_report import write_markdown
from benchmarks.speed_sections import (
    check_targets,
    flow_section,
    latency_section,
    memory_section,
    training_section,
)
from benchmarks.training_cost import DEFAULT_DATA_ROOT, memory_child

DEFAULT_OUTPUT_DIR = REPO_ROOT / "benchmarks" / "results"

SECTIONS = ("flow", "latency", "training_epoch", "peak_memory")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv (Sequence[str] | None, optional): Arguments; ``None`` reads ``sys.argv``. Defaults to ``None``.

    Returns:
        argparse.Namespace: The settings, with quick-mode sizes filled in.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (64 px, batch 2, 1 block per scale)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="MVTec AD root holding bottle")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per configuration (>= 2)")
    parser.add_argument("--num-workers", type=int, default=0, help="dataloader workers for the training epochs")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions of every forward")
    parser.add_argument("--compile", action="store_true", help="also time the flow through torch.compile")
    parser.add_argument(
        "--retain-freed-memory",
        action="store_true",
        help="keep freed memory in every measured process (anomalib_gcaflow.toolkit.RetainFreedMemory), for all models",
    )
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    settings = parser.parse_args(argv)
    settings.argv = list(sys.argv[1:] if argv is None else argv)
    settings.sections = [section.strip() for section in settings.sections.split(",") if section.strip()]
    unknown = sorted(set(settings.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown --sections {unknown}; choose from {list(SECTIONS)}")
    if settings.epochs < 2:
        parser.error(f"--epochs must be >= 2 (the first epoch is reported apart), got {settings.epochs}")
    if settings.quick:
        settings.image_size, settings.large_size, settings.batch_size = (64, 64), (96, 96), 2
        settings.repeats, settings.epochs, settings.max_batches, settings.memory_batches = 1, 2, 2, 1
    else:
        settings.image_size, settings.large_size, settings.batch_size = (256, 256), (512, 512), 16
        settings.max_batches, settings.memory_batches = None, None
    return settings


def run(settings: argparse.Namespace) -> dict[str, Any]:
    """Measure every section and write ``speed.json`` and ``speed.md`` into ``settings.output_dir``.

    Args:
        settings (argparse.Namespace): From :func:`parse_args`.

    Returns:
        dict[str, Any]: The results.
    """
    if settings.device == "cuda" and not torch.cuda.is_available():
        msg = "--device cuda was given but torch sees no CUDA device; run on a GPU machine or use --device cpu"
        raise ValueError(msg)
    results: dict[str, Any] = {
        # Schema 2: model ids from benchmarks.variants (schema 1, unversioned, called msflow_equiv msflow_equivalent).
        "schema": 2,
        "command": shlex.join(["python", "-m", "benchmarks.speed", *settings.argv]),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": settings.quick,
        "environment": environment(settings.device),
        # Process-wide, so every configuration below runs with the same allocator behaviour.
        "freed_memory_retained": settings.retain_freed_memory and retain_freed_memory(),
        "machine_peak": machine_peak_gflops(settings.device, settings.quick, settings.repeats),
        "section_seconds": {},
    }
    has_data = (settings.data_root / "bottle" / "train" / "good").is_dir()
    measure: dict[str, Callable[[argparse.Namespace], Any]] = {
        "flow": flow_section,
        "latency": latency_section,
        "training_epoch": training_section,
        "peak_memory": memory_section,
    }
    for section in settings.sections:
        if section in ("training_epoch", "peak_memory") and not has_data:
            results[section] = f"skipped: MVTec AD bottle not found under {settings.data_root}"
            continue
        seed_everything(0, verbose=False)
        start = time.perf_counter()
        results[section] = measure[section](settings)
        results["section_seconds"][section] = time.perf_counter() - start
    results["targets"] = check_targets(results)
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(settings.output_dir / "speed.json", results)
    write_markdown(results, settings.output_dir / "speed.md")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark from the command line.

    Args:
        argv (Sequence[str] | None, optional): Arguments; ``None`` reads ``sys.argv``. Defaults to ``None``.
    """
    settings = parse_args(argv)
    if settings.memory_child is not None:
        memory_child(json.loads(settings.memory_child))
        return
    run(settings)


if __name__ == "__main__":
    main()
