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
import gc
import hashlib
import json
import logging
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import timm
import torch
from anomalib.data import Folder, MVTecAD
from anomalib.engine import Engine
from anomalib.models import Cflow, Padim, Patchcore
from anomalib.models.components import AnomalibModule
from lightning.pytorch import seed_everything
from matplotlib.figure import Figure
from safetensors.torch import save_file
from torch import nn

from anomalib_gcaflow import GCAFlow
from anomalib_gcaflow.backbones import build_backbone
from anomalib_gcaflow.data.magnetic_tile import (
    ABNORMAL_DIR,
    MASK_DIR,
    NORMAL_DIR,
    convert_magnetic_tile,
)
from benchmarks.baselines import FASTFLOW_LAYERS, SharedBackboneFastflow
from benchmarks.environment import machine, versions
from benchmarks.flops import flow_gflop_per_image, model_gflop_per_image
from benchmarks.speed import inference_timing, machine_peak_gflops, peak_training_memory_mb
from benchmarks.timing import EpochTimer, cpu_seconds
from benchmarks.variants import ACCURACY_GRID, VARIANTS

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
DEFAULT_WORK_DIR = Path.home() / ".cache" / "anomalib_gcaflow" / "benchmark"
SCHEMA_VERSION = 1

logger = logging.getLogger("benchmarks.accuracy")

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
# Reference models of the ratio columns.
REFERENCES = ("fastflow", "msflow_equiv")

DATASETS = ("bottle", "magnetic_tile")
DATASET_LABELS = {"bottle": "MVTec AD bottle", "magnetic_tile": "Magnetic Tile"}

# Every model's own layer choice, named by stride stage ("layerK" = stride 2**(K+1)) so it maps onto any backbone.
GCAFLOW_LAYERS = ("layer1", "layer2", "layer3")
BASELINE_LAYERS = {
    "fastflow": FASTFLOW_LAYERS,
    "cflow": ("layer2", "layer3", "layer4"),
    "patchcore": ("layer2", "layer3"),
    "padim": ("layer1", "layer2", "layer3"),
}
# PaDiM's random channel selection keeps 100 channels, its paper's choice for ResNet-18 (anomalib knows no default
# for other backbones); never more than the backbone's stages have.
PADIM_FEATURES = 100

# Reported metric -> anomalib evaluator key.
METRICS = {
    "image_AUROC": "image_AUROC",
    "pixel_AUROC": "pixel_AUROC",
    "PRO": "pixel_AUPRO",
    "image_F1": "image_F1Score",
    "pixel_F1": "pixel_F1Score",
}
MAIN_METRICS = ("image_AUROC", "pixel_AUROC", "PRO", "image_F1")

_ALL_LAYERS = ("layer1", "layer2", "layer3", "layer4")

GCAFLOW_BACKBONE = "anomalib_gcaflow.backbones.build_backbone (strict load), checked tensor by tensor."
FASTFLOW_CLASS_PATH = "benchmarks.baselines.SharedBackboneFastflow"
BACKBONE_ADAPTATION = {
    "fastflow": (
        "Constructed as Fastflow(backbone='resnet18', pre_trained=False); then model.feature_extractor was replaced "
        "by the shared frozen backbone's stride-4/8/16 stages (build_backbone, strict load, checked tensor by "
        "tensor), and model.norms and model.fast_flow_blocks were rebuilt for their channels with anomalib's "
        "create_fast_flow_block and Fastflow's own flow_steps, hidden_ratio and conv3x3_only. The ResNet-18 was "
        "discarded before training; loss, optimiser (Adam 1e-3, weight decay 1e-5), anomaly map and score are "
        "anomalib's."
    ),
    "cflow": "timm local-dir: folder written from the shared weights; extractor checked tensor by tensor.",
    "patchcore": "timm local-dir: folder written from the shared weights; extractor checked tensor by tensor.",
    "padim": "timm local-dir: folder written from the shared weights; extractor checked tensor by tensor.",
}

# PatchCore's inference cost grows with its memory bank; for speed it gets a bank as large as bottle's would be.
SPEED_PATCHCORE_TRAIN_IMAGES = 209

SPEED_BATCH = 16

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
        gcaflow_warmup_epochs: GCAFlow's linear warm-up length.
        gcaflow_milestones: GCAFlow's step-decay epochs.
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
    gcaflow_warmup_epochs: int
    gcaflow_milestones: tuple[int, ...]
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


# --------------------------------------------------------------------------------------------------- backbone


class SharedBackbone:
    """The one set of backbone weights every model gets, loaded strictly once and checked in every model.

    GCAFlow and Fastflow build it with :func:`build_backbone` (a frozen ``FeaturePyramid``). Cflow and PatchCore
    build their extractor from a timm name, so they get ``local-dir:<folder>``, a timm model folder written from the
    strictly loaded weights. timm loads such a folder non-strictly when ``features_only`` is set, so every model's
    extractor is compared tensor by tensor with the reference after construction.

    Args:
        protocol: The protocol (backbone name and weights file).
        work_dir: Scratch folder for the timm model folder.
    """

    def __init__(self, protocol: Protocol, work_dir: Path) -> None:
        self.name = protocol.backbone
        self.weights_path = protocol.weights_path
        # All four stride stages, so that every model's layer choice is covered by the reference.
        self.reference = build_backbone(self.name, weights_path=self.weights_path, layers=_ALL_LAYERS)
        self.state = {key: value.detach().clone() for key, value in self.reference.extractor.state_dict().items()}
        self.module_names = dict(zip(_ALL_LAYERS, self.reference.extractor.feature_info.module_name(), strict=True))
        self.channels = dict(zip(_ALL_LAYERS, self.reference.channels, strict=True))
        self.strides = dict(zip(_ALL_LAYERS, self.reference.strides, strict=True))
        self.digest = _tensor_digest(self.state)
        self.folder = self._materialise(work_dir)

    def timm_name(self) -> str:
        """Return the timm model name that loads the shared weights (``local-dir:<folder>``).

        Returns:
            str: The name.
        """
        return f"local-dir:{self.folder}"

    def check(self, extractor: nn.Module, what: str) -> None:
        """Fail unless every tensor of ``extractor`` equals the reference's tensor of the same name.

        Args:
            extractor: A timm features model (or its wrapper) holding backbone weights.
            what: Description of the extractor, for the error message.
        """
        state = {k: v for k, v in extractor.state_dict().items() if not k.endswith("num_batches_tracked")}
        unknown = [key for key in state if key not in self.state]
        different = [key for key in state if key in self.state and not torch.equal(state[key].cpu(), self.state[key])]
        if not state or unknown or different:
            msg = (
                f"{what} does not hold the shared {self.name!r} weights ({len(unknown)} unknown and "
                f"{len(different)} different tensors, e.g. {(unknown + different)[:3]}); the comparison would not be "
                f"on one backbone. Delete {self.folder} and rerun."
            )
            raise RuntimeError(msg)

    def describe(self) -> dict[str, Any]:
        """Describe the shared backbone for the records.

        Returns:
            dict[str, Any]: Name, weights source and digest, stage names, channels and strides.
        """
        return {
            "name": self.name,
            "weights_path": self.weights_path,
            "weights_sha256_12": self.digest,
            "timm_folder": str(self.folder),
            "stages": {
                layer: {
                    "module": self.module_names[layer],
                    "channels": self.channels[layer],
                    "stride": self.strides[layer],
                }
                for layer in _ALL_LAYERS
            },
            "mean_std": [list(self.reference.mean), list(self.reference.std)],
        }

    def _materialise(self, work_dir: Path) -> Path:
        """Write (once) the timm folder: ``config.json`` with the input statistics, and ``model.safetensors``.

        Args:
            work_dir: Scratch folder.

        Returns:
            Path: The folder.
        """
        folder = work_dir / "backbones" / f"{self.name}-{self.digest}"
        # anomalib's TimmFeatureExtractor switches to its transformer path for any name containing "vit".
        if "vit" in str(folder).lower():
            msg = (
                f"The backbone folder {folder} contains 'vit', which anomalib reads as a ViT; pass another --work-dir."
            )
            raise ValueError(msg)
        weights = folder / "model.safetensors"
        if not weights.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            config = timm.get_pretrained_cfg(self.name).to_dict()
            for key in ("url", "hf_hub_id", "tag"):
                config.pop(key, None)
            config.update(mean=list(self.reference.mean), std=list(self.reference.std))
            (folder / "config.json").write_text(
                json.dumps({"architecture": self.name, "num_classes": config["num_classes"], "pretrained_cfg": config}),
            )
            partial = folder / "model.safetensors.partial"
            save_file({key: value.contiguous() for key, value in self.state.items()}, str(partial))
            partial.replace(weights)
        return folder


def _tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """Hash a state dict's names and values.

    Args:
        state: The state dict.

    Returns:
        str: The first 12 hexadecimal characters of its SHA-256.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


# --------------------------------------------------------------------------------------------------- models


def model_spec(name: str, protocol: Protocol, image_size: int, backbone: SharedBackbone) -> tuple[str, dict[str, Any]]:
    """Class (import path) and JSON-serialisable arguments of one model of the grid on the shared backbone.

    Args:
        name: Model id (see ``ALL_MODELS``).
        protocol: The protocol.
        image_size: Square input size.
        backbone: The shared backbone.

    Returns:
        tuple[str, dict[str, Any]]: Import path and keyword arguments (pre-processor, evaluator and visualizer
        excepted).
    """
    if name in VARIANTS:
        return "anomalib_gcaflow.GCAFlow", {
            "backbone": protocol.backbone,
            "weights_path": protocol.weights_path,
            "image_size": [image_size, image_size],
            "lr": protocol.gcaflow_lr,
            "warmup_epochs": protocol.gcaflow_warmup_epochs,
            "milestones": list(protocol.gcaflow_milestones),
            "max_epochs": protocol.epochs,
            **VARIANTS[name].kwargs,
        }
    if name == "fastflow":
        return FASTFLOW_CLASS_PATH, {"backbone": protocol.backbone, "weights_path": protocol.weights_path}
    if name == "cflow":
        # Cflow's training step needs one full fiber batch per feature map, even from a last batch of one image.
        smallest_map = (image_size // max(backbone.strides[layer] for layer in BASELINE_LAYERS["cflow"])) ** 2
        return "anomalib.models.Cflow", {
            "backbone": backbone.timm_name(),
            "layers": [backbone.module_names[layer] for layer in BASELINE_LAYERS["cflow"]],
            "pre_trained": True,
            "fiber_batch_size": min(64, smallest_map),
        }
    if name == "patchcore":
        return "anomalib.models.Patchcore", {
            "backbone": backbone.timm_name(),
            "layers": [backbone.module_names[layer] for layer in BASELINE_LAYERS["patchcore"]],
            "pre_trained": True,
            "coreset_sampling_ratio": protocol.patchcore_coreset_ratio,
        }
    if name == "padim":
        layers = BASELINE_LAYERS["padim"]
        return "anomalib.models.Padim", {
            "backbone": backbone.timm_name(),
            "layers": [backbone.module_names[layer] for layer in layers],
            "pre_trained": True,
            "n_features": min(PADIM_FEATURES, sum(backbone.channels[layer] for layer in layers)),
        }
    msg = f"Unknown model {name!r}; choose from {', '.join((*VARIANTS, *BASELINES, *ONE_PASS_EXTRA))}."
    raise ValueError(msg)


def build_model(
    name: str, protocol: Protocol, image_size: int, backbone: SharedBackbone
) -> tuple[AnomalibModule, dict]:
    """Build one model of the grid with the shared pre-processor and evaluator, and check its backbone weights.

    Args:
        name: Model id (see ``ALL_MODELS``).
        protocol: The protocol.
        image_size: Square input size.
        backbone: The shared backbone.

    Returns:
        tuple[AnomalibModule, dict]: The model and a description of how it was set up.
    """
    return instantiate(name, *model_spec(name, protocol, image_size, backbone), protocol, image_size, backbone)


def instantiate(
    name: str,
    class_path: str,
    kwargs: dict[str, Any],
    protocol: Protocol,
    image_size: int,
    backbone: SharedBackbone,
) -> tuple[AnomalibModule, dict]:
    """Build a model from its specification with the shared pre-processor and evaluator; check its backbone weights.

    Args:
        name: Model id (see ``ALL_MODELS``).
        class_path: Import path of its class (see :func:`model_spec`).
        kwargs: Its keyword arguments (see :func:`model_spec`).
        protocol: The protocol.
        image_size: Square input size.
        backbone: The shared backbone.

    Returns:
        tuple[AnomalibModule, dict]: The model and a description of how it was set up.
    """
    model = _MODEL_CLASSES[class_path](
        **kwargs,
        # One normalisation (the backbone weights'), one evaluator, no per-image visualisation files.
        pre_processor=GCAFlow.configure_pre_processor((image_size, image_size), protocol.backbone),
        evaluator=GCAFlow.configure_evaluator(),
        visualizer=False,
    )
    if name == "cflow":
        _check_timm_extractor(model.model.encoder, BASELINE_LAYERS["cflow"], backbone, name)
    elif name in ("patchcore", "padim"):
        _check_timm_extractor(model.model.feature_extractor, BASELINE_LAYERS[name], backbone, name)
    else:
        backbone.check(model.model.feature_extractor.extractor, f"{name}'s backbone")
    description = {
        "class": class_path,
        "init_args": kwargs,
        "layers": list(BASELINE_LAYERS.get(name, GCAFLOW_LAYERS)),
        "backbone_adaptation": BACKBONE_ADAPTATION.get(name, GCAFLOW_BACKBONE),
    }
    return model, description


_MODEL_CLASSES: dict[str, type[AnomalibModule]] = {
    "anomalib_gcaflow.GCAFlow": GCAFlow,
    FASTFLOW_CLASS_PATH: SharedBackboneFastflow,
    "anomalib.models.Cflow": Cflow,
    "anomalib.models.Patchcore": Patchcore,
    "anomalib.models.Padim": Padim,
}


def _check_timm_extractor(extractor: nn.Module, layers: Sequence[str], backbone: SharedBackbone, what: str) -> None:
    """Check an anomalib ``TimmFeatureExtractor``: every requested stage kept, and the shared weights loaded.

    Args:
        extractor: The ``TimmFeatureExtractor``.
        layers: Requested stride stages.
        backbone: The shared backbone.
        what: Model id, for error messages.
    """
    expected = [backbone.channels[layer] for layer in layers]
    # TimmFeatureExtractor drops unknown layer names with only a warning.
    if list(extractor.out_dims) != expected:
        msg = f"{what}'s extractor returns channels {list(extractor.out_dims)}, expected {expected} for {list(layers)}."
        raise RuntimeError(msg)
    backbone.check(extractor.feature_extractor, f"{what}'s backbone")


# --------------------------------------------------------------------------------------------------- data


def build_datamodule(dataset: str, settings: Settings) -> tuple[Any, dict[str, Any]]:
    """Build the data module of one data set; the validation split is the test set for both.

    anomalib fits the F1 threshold and the score normalisation on the validation split. MVTecAD uses the test set
    for it by default; Folder would otherwise hold out half of the test set, so both use ``same_as_test`` and test
    on every test image.

    Args:
        dataset: ``"bottle"`` or ``"magnetic_tile"``.
        settings: The invocation's settings.

    Returns:
        tuple[Any, dict[str, Any]]: The data module and a description (source, subset).
    """
    protocol = settings.protocol
    loader_args = {
        "train_batch_size": protocol.train_batch_size,
        "eval_batch_size": protocol.eval_batch_size,
        "num_workers": settings.num_workers,
        "val_split_mode": "same_as_test",
        "seed": 0,
    }
    if dataset == "bottle":
        description: dict[str, Any] = {"source": str(settings.data_root / "mvtec_ad"), "category": "bottle"}
        if protocol.limit is not None:
            description["subset"] = (
                f"at most {protocol.limit} training images and {protocol.limit} test images per class"
            )
        return MVTecAD(root=_bottle_root(settings), category="bottle", **loader_args), description
    if dataset == "magnetic_tile":
        return _magnetic_tile_datamodule(settings, loader_args)
    msg = f"Unknown data set {dataset!r}; choose from {', '.join(DATASETS)}."
    raise ValueError(msg)


def _magnetic_tile_datamodule(settings: Settings, loader_args: dict[str, Any]) -> tuple[Folder, dict[str, Any]]:
    """Convert (once; later calls find it done) the Magnetic Tile subset of the protocol and read it with ``Folder``.

    Args:
        settings: The invocation's settings.
        loader_args: Batch sizes, workers, split modes and seed shared with the other data set.

    Returns:
        tuple[Folder, dict[str, Any]]: The data module and a description of the subset.
    """
    protocol = settings.protocol
    source = settings.data_root / "magnetic_tile"
    _require(source / "MT_Free" / "Imgs", "Magnetic Tile")
    limit = protocol.magnetic_tile_limit
    # The converter's own rule: without a defect-free cap, the per-type cap applies to the defect-free images too.
    normal_limit = protocol.magnetic_tile_normal_limit if protocol.magnetic_tile_normal_limit is not None else limit
    target = settings.work_dir / "data" / f"magnetic_tile_defects{limit or 'all'}_normal{normal_limit or 'all'}"
    report = convert_magnetic_tile(source, target, limit=limit, normal_limit=normal_limit)
    description = {
        "source": str(source),
        "category": "magnetic_tile",
        "converted_to": str(target),
        "converted_with": "anomalib_gcaflow.data.magnetic_tile.convert_magnetic_tile (masks binarised at 128)",
        "defect_free_images": report.normal,
        "defective_images": report.defects,
        "subset": (
            f"{'all' if limit is None else f'at most {limit}'} defective images per type and "
            f"{'all' if normal_limit is None else f'at most {normal_limit}'} defect-free images, evenly spaced "
            "over the sorted file names; 20 % of the defect-free images are held out for testing (seed 0)"
        ),
    }
    datamodule = Folder(
        name="magnetic_tile",
        root=target,
        normal_dir=NORMAL_DIR,
        abnormal_dir=ABNORMAL_DIR,
        mask_dir=MASK_DIR,
        test_split_ratio=0.2,
        **loader_args,
    )
    return datamodule, description


def _bottle_root(settings: Settings) -> Path:
    """Return the MVTec AD root holding this protocol's bottle images (a copied subset under ``--limit``).

    Args:
        settings: The invocation's settings.

    Returns:
        Path: The root.
    """
    root = settings.data_root / "mvtec_ad"
    _require(root / "bottle" / "train" / "good", "MVTec AD bottle")
    limit = settings.protocol.limit
    return root if limit is None else _mvtec_subset(root, "bottle", limit, settings.work_dir)


def _require(path: Path, what: str) -> None:
    """Fail with the fix if a data folder is missing (anomalib would try to download it instead).

    Args:
        path: Folder that must exist.
        what: Name of the data set.
    """
    if not path.is_dir():
        msg = f"{what} not found: {path} is missing. Pass --data-root pointing to the folder that holds it."
        raise FileNotFoundError(msg)


def _mvtec_subset(root: Path, category: str, limit: int, work_dir: Path) -> Path:
    """Copy an MVTec-layout subset: ``limit`` training images, ``limit`` test images per class, with their masks.

    Images are drawn with a fixed seed, so every model and every seed sees the same subset. They are copied, not
    linked: anomalib drops files whose resolved path lies outside the data root.

    Args:
        root: The MVTec AD root.
        category: Category folder.
        limit: Images per split and class.
        work_dir: Scratch folder.

    Returns:
        Path: Root of the subset.
    """
    target = work_dir / "data" / f"mvtec_{category}_limit{limit}"
    if (target / category).is_dir():
        return target
    staging = Path(tempfile.mkdtemp(dir=_mkdir(work_dir / "data")))
    rng = random.Random(0)
    for class_dir in sorted([root / category / "train" / "good", *sorted((root / category / "test").iterdir())]):
        images = sorted(class_dir.glob("*.png"))
        chosen = sorted(rng.sample(images, min(limit, len(images))))
        relative = class_dir.relative_to(root)
        _mkdir(staging / relative)
        for image in chosen:
            shutil.copy2(image, staging / relative / image.name)
            mask = root / category / "ground_truth" / relative.name / f"{image.stem}_mask.png"
            if relative.parts[1] == "test" and mask.is_file():
                _mkdir(staging / category / "ground_truth" / relative.name)
                shutil.copy2(mask, staging / category / "ground_truth" / relative.name / mask.name)
    staging.replace(target)
    return target


def _mkdir(path: Path) -> Path:
    """Create a folder and its parents if needed.

    Args:
        path: The folder.

    Returns:
        Path: The folder.
    """
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------------- runs


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
    with tempfile.TemporaryDirectory(dir=_mkdir(settings.work_dir / "engine")) as scratch:
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


# --------------------------------------------------------------------------------------------------- speed


def measure_all_speed(
    settings: Settings,
    backbone: SharedBackbone,
    failures: list[dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Measure (or reuse, when resuming) every model's speed record, with the machine's peak next to them.

    Args:
        settings: The invocation's settings.
        backbone: The shared backbone.
        failures: Where a failed measurement is reported (the others go on).

    Returns:
        dict[str, dict[str, Any]]: Speed record per model id.
    """
    folder = _mkdir(settings.out / "speed")
    records: dict[str, dict[str, Any]] = {}
    peak: dict[str, Any] | None = None
    for name in settings.models:
        path = folder / f"{name}.json"
        record = _load_record(path, settings.protocol)
        if record is None or record["sizes"] != list(settings.speed_sizes):
            logger.warning("speed of %s", name)
            peak = peak or machine_peak_gflops(settings.protocol.device, settings.speed_smoke, settings.speed_repeats)
            try:
                record = measure_speed(name, settings, backbone, peak)
            except Exception as error:  # one broken measurement must not cost the grid
                logger.exception("speed of %s failed; the grid goes on", name)
                failures.append({"model": name, "dataset": "speed", "seed": None, "error": repr(error)})
                continue
            finally:
                gc.collect()
            _write_json(path, record)
        records[name] = record
    return records


def measure_speed(name: str, settings: Settings, backbone: SharedBackbone, peak: dict[str, Any]) -> dict[str, Any]:
    """Measure one model: parameters, size, latency (batch 1), throughput (batch 16), GFLOP, peak training memory.

    Args:
        name: Model id.
        settings: The invocation's settings.
        backbone: The shared backbone.
        peak: The machine's peak GFLOP/s, measured in this process.

    Returns:
        dict[str, Any]: The speed record.
    """
    protocol = settings.protocol
    record: dict[str, Any] = {
        "model": name,
        "protocol_digest": protocol.digest(),
        "sizes": list(settings.speed_sizes),
        "repeats": settings.speed_repeats,
        "machine_peak": peak,
        "machine": machine(protocol.device),
        "inference": {},
    }
    for size in settings.speed_sizes:
        seed_everything(0, verbose=False)
        model, _ = build_model(name, protocol, size, backbone)
        torch_model = _inference_ready(name, model, size).to(protocol.device)
        if size == protocol.image_size or "trainable_params" not in record:
            frozen = {id(p) for p in _backbone_module(name, torch_model).parameters()}
            # PatchCore's extractor leaves requires_grad on although nothing trains it: count outside the backbone.
            record["trainable_params"] = sum(
                p.numel() for p in torch_model.parameters() if p.requires_grad and id(p) not in frozen
            )
            record["size_mb"] = _stored_bytes(torch_model, _backbone_module(name, torch_model)) / 1e6
        shape = (size, size)
        single = inference_timing(torch_model, shape, 1, repeats=settings.speed_repeats)
        batched = inference_timing(torch_model, shape, SPEED_BATCH, repeats=settings.speed_repeats)
        gflop = model_gflop_per_image(torch_model, shape)
        record["inference"][str(size)] = {
            "latency_ms_b1": single["latency_ms"],
            "throughput_b16": batched["throughput"],
            "gflop_per_image": gflop,
            "gflop_per_image_after_backbone": flow_gflop_per_image(torch_model, shape),
            "achieved_gflops": gflop * batched["throughput"],
            "fraction_of_peak": gflop * batched["throughput"] / peak["gflops"],
            "timing_b1": single,
            "timing_b16": batched,
        }
        del model, torch_model
    class_path, kwargs = model_spec(name, protocol, protocol.image_size, backbone)
    record["peak_train_memory"] = {
        "image_size": protocol.image_size,
        "batch_size": protocol.train_batch_size,
        "batches": settings.memory_batches,
        "class": class_path,
        "init_args": kwargs,
    }
    record["peak_train_memory_mb"] = peak_training_memory_mb(
        class_path,
        kwargs,
        image_size=(protocol.image_size, protocol.image_size),
        batch_size=protocol.train_batch_size,
        data_root=_bottle_root(settings),
        max_batches=settings.memory_batches,
        device=protocol.device,
    )
    return record


def _inference_ready(name: str, model: AnomalibModule, image_size: int) -> nn.Module:
    """Return the torch model in eval mode, with PatchCore's memory bank filled to bottle's size.

    Args:
        name: Model id.
        model: The freshly built model.
        image_size: Square input size.

    Returns:
        nn.Module: The torch model, ready for inference.
    """
    torch_model = model.model.eval()
    if name == "patchcore":
        # One patch per stride-8 position (PatchCore's first stage) of every training image, then the coreset.
        patches = SPEED_PATCHCORE_TRAIN_IMAGES * (image_size // 8) ** 2
        bank_size = int(patches * model.coreset_sampling_ratio)
        torch_model.memory_bank = torch.randn(bank_size, sum(torch_model.feature_extractor.out_dims))
    return torch_model


def _backbone_module(name: str, torch_model: nn.Module) -> nn.Module:
    """Return the frozen backbone inside a model's torch model.

    Args:
        name: Model id.
        torch_model: The torch model.

    Returns:
        nn.Module: Its backbone.
    """
    return torch_model.encoder if name == "cflow" else torch_model.feature_extractor


def _stored_bytes(torch_model: nn.Module, backbone: nn.Module) -> int:
    """Bytes of everything the model stores beyond the shared backbone (parameters and buffers).

    Args:
        torch_model: The torch model.
        backbone: Its backbone module.

    Returns:
        int: The byte count.
    """
    shared = {id(t) for t in backbone.state_dict(keep_vars=True).values()}
    return sum(
        t.numel() * t.element_size() for t in torch_model.state_dict(keep_vars=True).values() if id(t) not in shared
    )


# --------------------------------------------------------------------------------------------------- summary


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
    for dataset in _datasets_of(settings):
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


def _datasets_of(settings: Settings) -> list[str]:
    """Return the data sets that have runs in the grid, in the canonical order.

    Args:
        settings: The invocation's settings.

    Returns:
        list[str]: Data set ids with at least one seed.
    """
    return [dataset for dataset in DATASETS if any(seeds_for(settings.seeds, dataset, m) for m in settings.models)]


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


# --------------------------------------------------------------------------------------------------- report


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


# --------------------------------------------------------------------------------------------------- driver


def run_grid(settings: Settings) -> dict[str, Any]:
    """Run (or resume) the whole grid and the speed measurements, then write every output.

    Args:
        settings: The invocation's settings.

    Returns:
        dict[str, Any]: The content of ``accuracy.json``.
    """
    start = time.perf_counter()
    out = _mkdir(settings.out)
    _mkdir(out / "runs")
    _mkdir(settings.work_dir)
    write_command(settings)
    backbone = SharedBackbone(settings.protocol, settings.work_dir)
    records, failures, kept = [], [], 0
    speed = measure_all_speed(settings, backbone, failures) if settings.speed else {}
    jobs = [
        (dataset, model, seed)
        for dataset in _datasets_of(settings)
        for model in settings.models
        for seed in seeds_for(settings.seeds, dataset, model)
    ]
    for index, (dataset, model, seed) in enumerate(jobs, start=1):
        path = out / "runs" / f"{dataset}__{model}__seed{seed}.json"
        failed = path.with_suffix(".failed.json")
        record = _load_record(path, settings.protocol)
        if record is None:
            logger.warning("[%d/%d] %s on %s, seed %d", index, len(jobs), model, dataset, seed)
            try:
                record = run_one(model, dataset, seed, settings, backbone)
            except Exception as error:  # one broken run must not cost the rest of the grid
                logger.exception("%s on %s, seed %d failed; the grid goes on", model, dataset, seed)
                failures.append({"model": model, "dataset": dataset, "seed": seed, "error": repr(error)})
                _write_json(failed, failures[-1] | {"traceback": traceback.format_exc()})
                continue
            finally:
                gc.collect()
            _write_json(path, record)
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
    _write_json(out / "accuracy.json", summary)
    write_markdown(summary, out / "accuracy.md")
    write_plot(summary, out / "accuracy.png")
    return summary


def _load_record(path: Path, protocol: Protocol) -> dict[str, Any] | None:
    """Load a finished record for resuming, refusing one made under another protocol.

    Args:
        path: The record's file.
        protocol: The current protocol.

    Returns:
        dict[str, Any] | None: The record, or ``None`` if it does not exist yet.
    """
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("protocol_digest") != protocol.digest():
        msg = (
            f"{path} was made under another protocol ({record.get('protocol')}) than this command's "
            f"({asdict(protocol)}); results of different protocols must not be mixed. Use another --out, or delete "
            "the old records."
        )
        raise ValueError(msg)
    return record


def _write_json(path: Path, content: dict[str, Any]) -> None:
    """Write JSON atomically, so an interrupted run never leaves a half-written record to be resumed from.

    Args:
        path: Target file.
        content: The content.
    """
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(content, indent=1, sort_keys=False) + "\n")
    partial.replace(path)


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
    """Validate ``--seeds`` rules (see :func:`seeds_for`).

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
