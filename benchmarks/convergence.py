r"""Convergence study: accuracy against training epochs and training CPU-minutes, one protocol for every model.

For every (data set, model, seed), under the accuracy benchmark's protocol (one shared backbone and its weights,
one input normalisation, one evaluator, the same data subsets):

- trained models (GCAFlow variants, Cflow, Fastflow): ONE training run with the budget ``--epochs N`` (the model's
  own ``max_epochs`` and schedule set for N), evaluated on the test set after every epoch in ``--eval-epochs``;
  with ``--per-budget``, one separate run per listed budget instead, each trained for exactly that many epochs;
- one-pass models (PatchCore, PaDiM): one fit.

Metrics come from the models' raw outputs in float64 (see ``benchmarks/raw_eval.py``); the last epoch also
records what anomalib's own ``Engine.test`` reports. Training wall-clock and CPU seconds exclude evaluation.
Writes ``<out>/runs/<dataset>__<model>__seed<k>[__budget<b>]__<digest>.json`` (resumable: an existing record is
skipped) and ``<out>/convergence.{json,md,png}`` from the records of this protocol.

Usage, from the repository root::

    python -m benchmarks.convergence --out benchmarks/results/convergence --epochs 20 --eval-epochs 1 2 5 10 20
"""

from __future__ import annotations

import argparse
import ast
import gc
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.convergence_report import summarise, write_markdown, write_plot
from benchmarks.convergence_run import (
    AUTOCAST_DTYPES,
    ONE_PASS,
    TRAINED,
    Settings,
    Study,
    gcaflow_defaults,
    train_and_evaluate,
)
from benchmarks.environment import REPO_ROOT, cpu_flags, load_average, load_record, machine, versions
from benchmarks.protocol import (
    CPU_MAGNETIC_TILE_LIMIT,
    CPU_MAGNETIC_TILE_NORMAL_LIMIT,
    CPU_PATCHCORE_CORESET_RATIO,
    DATASETS,
    DEFAULT_DATA_ROOT,
    DEFAULT_WORK_DIR,
    Protocol,
    seeds_for,
)
from benchmarks.protocol import Settings as AccuracySettings
from benchmarks.records import mkdir, write_json
from benchmarks.shared_backbone import SharedBackbone
from benchmarks.variants import VARIANTS

DEFAULT_MODELS = ("gcaflow", "msflow_equiv", "cflow", "fastflow", "patchcore", "padim")
DEFAULT_SEEDS = ("0", "gcaflow,msflow_equiv=0,1,2")

logger = logging.getLogger("benchmarks.convergence")


def jobs(settings: Settings) -> list[tuple[str, str, int, int, tuple[int, ...]]]:
    """Every run of the invocation: (data set, model, seed, budget, epochs to evaluate after).

    Args:
        settings: The invocation's settings.

    Returns:
        list[tuple[str, str, int, int, tuple[int, ...]]]: The runs, in order.
    """
    study = settings.study
    listed = []
    for dataset in settings.datasets:
        for model in settings.models:
            for seed in seeds_for(settings.seeds, dataset, model):
                if model in ONE_PASS:
                    listed.append((dataset, model, seed, 1, (1,)))
                elif study.per_budget:
                    listed += [(dataset, model, seed, budget, (budget,)) for budget in study.eval_epochs]
                else:
                    listed.append((dataset, model, seed, study.base.epochs, study.eval_epochs))
    return listed


def record_path(settings: Settings, dataset: str, model: str, seed: int, budget: int) -> Path:
    """File of one run's record.

    Args:
        settings: The invocation's settings.
        dataset: Data set id.
        model: Model id.
        seed: Seed.
        budget: Epochs trained.

    Returns:
        Path: ``<out>/runs/<dataset>__<model>__seed<k>[__budget<b>]__<digest>.json``.
    """
    suffix = f"__budget{budget}" if settings.study.per_budget and model not in ONE_PASS else ""
    return settings.data.out / "runs" / f"{dataset}__{model}__seed{seed}{suffix}__{settings.study.digest()}.json"


def run_study(settings: Settings) -> dict[str, Any]:
    """Run (or resume) every run, then write the summary, the table and the plot.

    Args:
        settings: The invocation's settings.

    Returns:
        dict[str, Any]: The content of ``convergence.json``.
    """
    start, load_start = time.perf_counter(), load_average()
    mkdir(settings.data.out / "runs")
    backbones: dict[str, SharedBackbone] = {}
    failures, done, kept = [], 0, 0
    planned = jobs(settings)
    for index, (dataset, model, seed, budget, eval_epochs) in enumerate(planned, start=1):
        path = record_path(settings, dataset, model, seed, budget)
        if path.is_file():
            logger.warning("[%d/%d] %s on %s, seed %d: done before, kept", index, len(planned), model, dataset, seed)
            kept += 1
            continue
        logger.warning("[%d/%d] %s on %s, seed %d, %d epochs", index, len(planned), model, dataset, seed, budget)
        try:
            record, _ = train_and_evaluate(model, dataset, seed, budget, eval_epochs, settings, backbones)
        except Exception as error:  # one broken run must not cost the rest of the study
            logger.exception("%s on %s, seed %d failed; the study goes on", model, dataset, seed)
            failures.append({"model": model, "dataset": dataset, "seed": seed, "budget": budget, "error": repr(error)})
            write_json(path.with_suffix(".failed.json"), failures[-1] | {"traceback": traceback.format_exc()})
            continue
        finally:
            gc.collect()
        write_json(path, record)
        path.with_suffix(".failed.json").unlink(missing_ok=True)
        done += 1
    # Every record of this protocol in --out, also those of other invocations (split by model, data set or seed).
    records = [
        json.loads(path.read_text())
        for path in sorted(settings.data.out.glob(f"runs/*__{settings.study.digest()}.json"))
    ]
    summary = summarise(records, settings.study)
    summary |= {
        "command": settings.argv,
        "failed_runs": failures,
        "invocation": {"seconds": time.perf_counter() - start, "runs_done": done, "runs_kept": kept},
        "versions": versions(),
        "machine": machine(settings.study.base.device) | {"cpu_flags": cpu_flags()},
        "load_average": load_record(load_start, load_average()),
    }
    write_json(settings.data.out / "convergence.json", summary)
    write_markdown(summary, settings.data.out / "convergence.md")
    write_plot(summary, settings.data.out / "convergence.png")
    return summary


def _option(text: str) -> tuple[str, Any]:
    """Parse one ``key=value`` GCAFlow option; the value is a Python literal or else a string.

    Args:
        text: The option.

    Returns:
        tuple[str, Any]: Key and value.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key:
        msg = f"--gcaflow-args {text!r}: give key=value, e.g. lr=1e-3."
        raise argparse.ArgumentTypeError(msg)
    literals = {"true": True, "false": False, "none": None, "null": None}
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = literals.get(raw.lower(), raw)
    return key, list(value) if isinstance(value, tuple) else value


def parse_args(argv: Sequence[str]) -> Settings:
    """Turn the command line into settings.

    Args:
        argv: Command-line arguments (without the program name).

    Returns:
        Settings: The settings.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "convergence")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="model ids (default: %(default)s)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument(
        "--seeds", action="append", default=None, metavar="[TARGET=]S1,S2", help="seed rules as in benchmarks.accuracy"
    )
    parser.add_argument("--epochs", type=int, default=20, help="training budget N (default: %(default)s)")
    parser.add_argument("--eval-epochs", type=int, nargs="+", default=[1, 2, 5, 10, 20], help="N is always added")
    parser.add_argument("--per-budget", action="store_true", help="one run per budget in --eval-epochs")
    parser.add_argument("--gcaflow-args", type=_option, nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights-path", default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--precision", choices=tuple(AUTOCAST_DTYPES), default="32-true", help="training and evaluation precision"
    )
    parser.add_argument("--patchcore-coreset-ratio", type=float, default=CPU_PATCHCORE_CORESET_RATIO)
    parser.add_argument("--limit", type=int, default=None, help="cap on bottle's images per split and class (tests)")
    parser.add_argument("--magnetic-tile-limit", type=int, default=CPU_MAGNETIC_TILE_LIMIT)
    parser.add_argument("--magnetic-tile-normal-limit", type=int, default=CPU_MAGNETIC_TILE_NORMAL_LIMIT)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument("--num-workers", type=int, default=1)
    args = parser.parse_args(list(argv))
    known = (*VARIANTS, *TRAINED, *ONE_PASS)
    if unknown := [m for m in args.models if m not in known]:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(known)}")
    if args.epochs < 1 or min(args.eval_epochs) < 1 or max(args.eval_epochs) > args.epochs:
        parser.error(f"--eval-epochs must lie in 1..--epochs ({args.epochs}); got {args.eval_epochs}")
    options = dict(args.gcaflow_args)
    defaults = gcaflow_defaults() | options
    base = Protocol(
        image_size=args.image_size,
        epochs=args.epochs,
        backbone=args.backbone,
        weights_path=str(Path(args.weights_path).resolve()) if args.weights_path else None,
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        gcaflow_lr=defaults["lr"],
        gcaflow_warmup_epochs=defaults["warmup_epochs"],
        gcaflow_milestones=None if defaults["milestones"] is None else tuple(defaults["milestones"]),
        patchcore_coreset_ratio=args.patchcore_coreset_ratio,
        limit=args.limit,
        magnetic_tile_limit=args.magnetic_tile_limit,
        magnetic_tile_normal_limit=args.magnetic_tile_normal_limit,
        device=args.device,
    )
    study = Study(
        base=base,
        eval_epochs=tuple(sorted({*args.eval_epochs, args.epochs})),
        per_budget=args.per_budget,
        gcaflow_args=tuple(sorted((key, json.dumps(value)) for key, value in options.items())),
        gcaflow_defaults=json.dumps(gcaflow_defaults(), sort_keys=True),
        precision=args.precision,
    )
    data = AccuracySettings(
        protocol=base,
        out=args.out.resolve(),
        models=tuple(args.models),
        seeds=(),
        data_root=args.data_root.resolve(),
        work_dir=args.work_dir.resolve(),
        num_workers=args.num_workers,
        speed=False,
        speed_sizes=(),
        speed_repeats=0,
        memory_batches=None,
        speed_smoke=False,
        argv=[],
    )
    return Settings(
        study=study,
        data=data,
        models=tuple(args.models),
        datasets=tuple(args.datasets),
        seeds=tuple(args.seeds or DEFAULT_SEEDS),
        argv=["python", "-m", "benchmarks.convergence", *argv],
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study from the command line.

    Args:
        argv: Arguments; ``None`` reads ``sys.argv``.

    Returns:
        int: Exit status (1 when a run failed; rerunning retries only the failed runs).
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    summary = run_study(parse_args(sys.argv[1:] if argv is None else argv))
    return 1 if summary["failed_runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
