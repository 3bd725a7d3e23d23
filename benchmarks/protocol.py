"""The comparison protocol shared by the accuracy benchmark and the convergence study.

What is compared (model and data set ids, their labels, the metrics), under which rules (:class:`Protocol`, whose
digest every record carries), the CPU budget's defaults, and which seeds each run gets (:func:`seeds_for`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.environment import REPO_ROOT
from benchmarks.variants import ACCURACY_GRID, VARIANTS

DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
DEFAULT_WORK_DIR = Path.home() / ".cache" / "anomalib_gcaflow" / "benchmark"
# Schema of the accuracy benchmark's run records and summary.
SCHEMA_VERSION = 1

# GCAFlow and its ablations in the default grid: keyword arguments over GCAFlow's paper defaults.
GCAFLOW_VARIANTS: dict[str, dict[str, Any]] = {name: dict(VARIANTS[name].kwargs) for name in ACCURACY_GRID}
BASELINES = ("fastflow", "cflow", "patchcore")
ALL_MODELS = (*GCAFLOW_VARIANTS, *BASELINES)
# PaDiM is built on the shared backbone too, for the convergence study's one-pass lines.
ONE_PASS_EXTRA = ("padim",)
MODEL_LABELS = {
    **{name: entry.label for name, entry in VARIANTS.items()},
    "fastflow": "Fastflow (anomalib)",
    "cflow": "Cflow (anomalib)",
    "patchcore": "PatchCore (anomalib)",
    "padim": "PaDiM (anomalib)",
}

DATASETS = ("bottle", "magnetic_tile")
DATASET_LABELS = {"bottle": "MVTec AD bottle", "magnetic_tile": "Magnetic Tile"}

# Reported metric -> anomalib evaluator key.
METRICS = {
    "image_AUROC": "image_AUROC",
    "pixel_AUROC": "pixel_AUROC",
    "PRO": "pixel_AUPRO",
    "image_F1": "image_F1Score",
    "pixel_F1": "pixel_F1Score",
}
MAIN_METRICS = ("image_AUROC", "pixel_AUROC", "PRO", "image_F1")

# The CPU budget (about an hour on 2 cores; see benchmarks/README.md for how it was sized).
CPU_EPOCHS = 3
CPU_MAGNETIC_TILE_LIMIT = 12
CPU_MAGNETIC_TILE_NORMAL_LIMIT = 150
# PatchCore's greedy coreset selection costs 0.3-0.4 s per kept patch on 2 cores at 256x256: 1 % (the PatchCore
# paper's smallest published setting) takes about 12 minutes on bottle, its default 10 % about two hours.
CPU_PATCHCORE_CORESET_RATIO = 0.01
# Three seeds where the main claim is decided (GCAFlow against the MSFlow-equivalent, on bottle), one for
# the rest; on Magnetic Tile only GCAFlow, the MSFlow-equivalent and Fastflow (see benchmarks/README.md).
CPU_SEEDS = (
    "0",
    "bottle/gcaflow,msflow_equiv=0,1,2",
    "magnetic_tile=",
    "magnetic_tile/gcaflow,msflow_equiv,fastflow=0",
)
PAPER_SEEDS = ("0,1,2",)


@dataclass(frozen=True)
class Protocol:
    """Everything that must be identical for two runs to be comparable; stored in and checked against every record.

    Args:
        image_size: Square input size every model is resized to.
        epochs: Epoch budget of every trained model (PatchCore builds its memory bank in its one epoch).
        backbone: Backbone network shared by every model.
        weights_path: Local backbone weights file, or ``None`` for the built-in source.
        train_batch_size: Training batch size.
        eval_batch_size: Validation and test batch size (Cflow normalises its maps per batch).
        gcaflow_lr: Adam learning rate of every GCAFlow variant.
        gcaflow_warmup_epochs: GCAFlow's linear warm-up length (``None``: GCAFlow's, scaled to the budget).
        gcaflow_milestones: GCAFlow's step-decay epochs (``None``: GCAFlow's, scaled to the budget).
        patchcore_coreset_ratio: Fraction of PatchCore's training patches kept in its memory bank.
        limit: Cap on MVTec AD bottle's training images and test images per class (``None``: all).
        magnetic_tile_limit: Cap on Magnetic Tile defective images per defect type (``None``: all).
        magnetic_tile_normal_limit: Cap on Magnetic Tile defect-free images, 20 % of which are tested
            (``None``: all).
        device: ``"cpu"`` or ``"cuda"``.
    """

    image_size: int
    epochs: int
    backbone: str
    weights_path: str | None
    train_batch_size: int
    eval_batch_size: int
    gcaflow_lr: float
    gcaflow_warmup_epochs: int | None
    gcaflow_milestones: tuple[int, ...] | None
    patchcore_coreset_ratio: float
    limit: int | None
    magnetic_tile_limit: int | None
    magnetic_tile_normal_limit: int | None
    device: str

    def digest(self) -> str:
        """Short hash of the protocol, used to refuse mixing records of different protocols.

        Returns:
            str: 12 hexadecimal characters.
        """
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Settings:
    """One invocation: the protocol plus what does not change results.

    Args:
        protocol: The comparison protocol.
        out: Results folder.
        models: Model ids to run.
        seeds: ``--seeds`` rules, in order (see :func:`seeds_for`).
        data_root: Folder holding ``mvtec_ad`` and ``magnetic_tile``.
        work_dir: Scratch folder outside the repository (converted data, backbone folder, checkpoints).
        num_workers: Data-loader workers.
        speed: Measure speed.
        speed_sizes: Square input sizes of the speed measurements.
        speed_repeats: Timed repetitions of each speed measurement.
        memory_batches: Training batches of the peak-memory measurement (``None``: one whole epoch).
        speed_smoke: Measure the machine peak on small operands (for tests: fast, not a peak).
        argv: The command line (as ``python -m benchmarks.accuracy ...``), recorded with the results.
    """

    protocol: Protocol
    out: Path
    models: tuple[str, ...]
    seeds: tuple[str, ...]
    data_root: Path
    work_dir: Path
    num_workers: int
    speed: bool
    speed_sizes: tuple[int, ...]
    speed_repeats: int
    memory_batches: int | None
    speed_smoke: bool
    argv: list[str]


def seeds_for(rules: Sequence[str], dataset: str, model: str) -> tuple[int, ...]:
    """Seeds of one model on one data set: those of the last ``--seeds`` rule that matches it.

    Args:
        rules: Rules ``[TARGET=]S1,S2``. TARGET is a data set, comma-separated model ids, or ``DATASET/`` followed
            by comma-separated model ids; without TARGET a rule matches every run.
        dataset: Data set id.
        model: Model id.

    Returns:
        tuple[int, ...]: The seeds (empty: not run).
    """
    seeds: tuple[int, ...] = ()
    for rule in rules:
        target, _, listed = rule.rpartition("=")
        scope, _, names = target.rpartition("/")
        if not target:
            matches = True
        elif not scope and names in DATASETS:
            matches = names == dataset
        else:
            matches = scope in ("", dataset) and model in names.split(",")
        if matches:
            seeds = tuple(int(part) for part in listed.split(",") if part)
    return seeds


def datasets_of(settings: Settings) -> list[str]:
    """Return the data sets that have runs in the grid, in the canonical order.

    Args:
        settings: The invocation's settings.

    Returns:
        list[str]: Data set ids with at least one seed.
    """
    return [dataset for dataset in DATASETS if any(seeds_for(settings.seeds, dataset, m) for m in settings.models)]
