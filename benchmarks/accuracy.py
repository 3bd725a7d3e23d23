r"""Accuracy and speed benchmark: GCAFlow, its ablations and anomalib's Fastflow, Cflow and PatchCore, one protocol.

One command trains and tests the whole grid (models x data sets x seeds) and measures every model's speed in the
same process, then writes:

- ``<out>/runs/<dataset>__<model>__seed<k>.json``: one record per run (model, config, data set, category, seed,
  metrics, timings, versions, machine);
- ``<out>/speed/<model>.json``: one speed record per model (parameters, size, latency, throughput, peak memory,
  achieved and peak GFLOP/s);
- ``<out>/accuracy.json``, ``<out>/accuracy.md``, ``<out>/accuracy.png``: the summary (mean +- std per model,
  ratios to Fastflow and to the MSFlow-equivalent, speed columns) and ``<out>/COMMAND.md``: the command line.

Protocol (the same for every model): the same frozen pretrained backbone network and weights, the same input size,
the same epoch budget and batch size, metrics of the LAST epoch (no model selection on the test set), the same
evaluator. A run whose JSON already exists with the same protocol is skipped, so an interrupted run resumes.

Usage, from the repository root::

    python -m benchmarks.accuracy --out benchmarks/results               # CPU budget, about an hour on 2 cores
    python -m benchmarks.accuracy --out results_paper --paper-scale \\
        --weights-path wide_resnet50_2-95faca4d.pth                      # 512^2, WRN50, 100 epochs, cuda
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

from benchmarks.accuracy_runner import logger, run_grid
from benchmarks.environment import REPO_ROOT
from benchmarks.protocol import (
    ALL_MODELS,
    CPU_EPOCHS,
    CPU_MAGNETIC_TILE_LIMIT,
    CPU_MAGNETIC_TILE_NORMAL_LIMIT,
    CPU_PATCHCORE_CORESET_RATIO,
    CPU_SEEDS,
    DATASETS,
    DEFAULT_DATA_ROOT,
    DEFAULT_WORK_DIR,
    PAPER_SEEDS,
    Protocol,
    Settings,
)


def parse_args(argv: Sequence[str]) -> Settings:
    """Turn the command line into settings; ``--paper-scale`` switches every default to the paper's budget.

    Args:
        argv: Command-line arguments (without the program name).

    Returns:
        Settings: The settings.
    """
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "benchmarks" / "results", help="results folder (default: %(default)s)"
    )
    parser.add_argument(
        "--paper-scale",
        action="store_true",
        help="the paper's budget: 512x512, wide_resnet50_2, 100 epochs, MSFlow's LR schedule, cuda, every seed",
    )
    parser.add_argument(
        "--models", default=",".join(ALL_MODELS), help="comma-separated model ids (default: %(default)s)"
    )
    parser.add_argument(
        "--seeds",
        action="append",
        default=None,
        metavar="[TARGET=]S1,S2",
        help="seeds of the runs TARGET matches (a data set, model ids, or DATASET/MODEL,MODEL; none: every run); "
        "repeatable, later rules override earlier ones; runs without seeds are skipped. "
        f"Default: {' '.join(CPU_SEEDS)} (CPU), 0,1,2 (paper scale)",
    )
    parser.add_argument("--image-size", type=int, default=None, help="square input size (default 256; paper 512)")
    parser.add_argument("--epochs", type=int, default=None, help=f"epoch budget (default {CPU_EPOCHS}; paper 100)")
    parser.add_argument(
        "--backbone", default=None, help="backbone (default tf_efficientnet_lite0; paper wide_resnet50_2)"
    )
    parser.add_argument("--weights-path", default=None, help="local backbone weights file (WRN50 without a network)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="device (default cpu; paper cuda)")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="training and test batch size (default: %(default)s)"
    )
    parser.add_argument(
        "--patchcore-coreset-ratio",
        type=float,
        default=None,
        help=f"PatchCore's coreset fraction (default {CPU_PATCHCORE_CORESET_RATIO} on CPU, its own 0.1 at paper scale)",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="cap on bottle's training images and test images per class (tests)"
    )
    parser.add_argument(
        "--magnetic-tile-limit",
        type=int,
        default=None,
        help=f"Magnetic Tile defective images per defect type (default {CPU_MAGNETIC_TILE_LIMIT}; paper: all)",
    )
    parser.add_argument(
        "--magnetic-tile-normal-limit",
        type=int,
        default=None,
        help=f"Magnetic Tile defect-free images, 20 %% tested (default {CPU_MAGNETIC_TILE_NORMAL_LIMIT}; paper: all)",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=DEFAULT_DATA_ROOT,
        help="folder with mvtec_ad, magnetic_tile (default: %(default)s)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK_DIR,
        help="scratch folder outside the repository (default: %(default)s)",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="data-loader workers (default 1 on CPU, whose cores compute; 4 on cuda)",
    )
    parser.add_argument("--no-speed", action="store_true", help="skip the speed measurements")
    parser.add_argument("--speed-sizes", default=None, help="comma-separated square sizes (default 256,512)")
    parser.add_argument(
        "--speed-repeats", type=int, default=None, help="timed repetitions (default 2 on CPU, 20 on cuda)"
    )
    parser.add_argument(
        "--speed-smoke",
        action="store_true",
        help="machine peak on small operands: fast, for tests, not a peak",
    )
    parser.add_argument(
        "--memory-batches",
        type=int,
        default=None,
        help="training batches of the peak-memory measurement (default 2 on CPU; a whole epoch at paper scale)",
    )
    args = parser.parse_args(list(argv))

    paper = args.paper_scale
    models = tuple(m for m in args.models.split(",") if m)
    unknown = [m for m in models if m not in ALL_MODELS]
    if unknown or not models:
        parser.error(f"--models: unknown {unknown or 'empty list'}; choose from {', '.join(ALL_MODELS)}")
    backbone = args.backbone or ("wide_resnet50_2" if paper else "tf_efficientnet_lite0")
    device = args.device or ("cuda" if paper else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda (the --paper-scale default) needs a CUDA GPU; pass --device cpu to run on the CPU")
    protocol = Protocol(
        image_size=args.image_size or (512 if paper else 256),
        epochs=args.epochs or (100 if paper else CPU_EPOCHS),
        backbone=backbone,
        weights_path=str(Path(args.weights_path).resolve()) if args.weights_path else None,
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        # The paper's (MSFlow's) recipe at full scale; at the small CPU budget the rate that converges in a few epochs.
        gcaflow_lr=1e-4 if paper else 1e-3,
        gcaflow_warmup_epochs=12 if paper else 0,
        gcaflow_milestones=(70, 90),
        patchcore_coreset_ratio=args.patchcore_coreset_ratio or (0.1 if paper else CPU_PATCHCORE_CORESET_RATIO),
        limit=args.limit,
        magnetic_tile_limit=args.magnetic_tile_limit or (None if paper else CPU_MAGNETIC_TILE_LIMIT),
        magnetic_tile_normal_limit=args.magnetic_tile_normal_limit
        or (None if paper else CPU_MAGNETIC_TILE_NORMAL_LIMIT),
        device=device,
    )
    default_sizes = "256,512"
    return Settings(
        protocol=protocol,
        out=args.out.resolve(),
        models=models,
        seeds=_check_seed_rules(args.seeds or (PAPER_SEEDS if paper else CPU_SEEDS), parser),
        data_root=args.data_root.resolve(),
        work_dir=args.work_dir.resolve(),
        num_workers=args.num_workers if args.num_workers is not None else (4 if device == "cuda" else 1),
        speed=not args.no_speed,
        speed_sizes=tuple(int(s) for s in (args.speed_sizes or default_sizes).split(",") if s),
        speed_repeats=args.speed_repeats or (20 if device == "cuda" else 2),
        memory_batches=args.memory_batches or (None if paper else 2),
        speed_smoke=args.speed_smoke,
        argv=["python", "-m", "benchmarks.accuracy", *argv],
    )


def _check_seed_rules(rules: Sequence[str], parser: argparse.ArgumentParser) -> tuple[str, ...]:
    """Validate ``--seeds`` rules (see :func:`benchmarks.protocol.seeds_for`).

    Args:
        rules: The rules.
        parser: The parser, to report errors.

    Returns:
        tuple[str, ...]: The rules.
    """
    for rule in rules:
        target, _, listed = rule.rpartition("=")
        if not all(part.isdigit() for part in listed.split(",") if part):
            parser.error(f"--seeds {rule!r}: give comma-separated integers, optionally after TARGET=")
        dataset, _, names = target.rpartition("/")
        known = ALL_MODELS if dataset else (*DATASETS, *ALL_MODELS)
        unknown = [name for name in names.split(",") if name not in known] if target else []
        if dataset not in ("", *DATASETS) or unknown:
            parser.error(
                f"--seeds {rule!r}: TARGET must be a data set ({', '.join(DATASETS)}), comma-separated model ids "
                f"({', '.join(ALL_MODELS)}), or DATASET/ followed by model ids",
            )
    return tuple(rules)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark from the command line.

    Args:
        argv: Arguments; ``None`` reads ``sys.argv``.

    Returns:
        int: Exit status.
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    settings = parse_args(sys.argv[1:] if argv is None else argv)
    summary = run_grid(settings)
    logger.warning(
        "%d runs summarised in %s (%.0f s)",
        len(summary["runs"]),
        settings.out / "accuracy.md",
        summary["invocation"]["seconds"],
    )
    if summary["failed_runs"]:
        logger.error(
            "%d runs or measurements failed; rerunning the same command retries only them.", len(summary["failed_runs"])
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
