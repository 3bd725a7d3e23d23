"""Every model of the accuracy and convergence benchmarks, built on the shared backbone with one pre-processor.

:func:`model_spec` gives a model's class and JSON-serialisable arguments (recorded with every run),
:func:`instantiate` builds it with the shared normalisation and evaluator and checks its backbone weights tensor by
tensor, :func:`build_model` does both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from anomalib.models import Cflow, Padim, Patchcore
from anomalib.models.components import AnomalibModule
from torch import nn

from anomalib_gcaflow import GCAFlow
from benchmarks.baselines import FASTFLOW_LAYERS, SharedBackboneFastflow
from benchmarks.protocol import BASELINES, ONE_PASS_EXTRA, Protocol
from benchmarks.shared_backbone import SharedBackbone
from benchmarks.variants import VARIANTS

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

GCAFLOW_BACKBONE = "anomalib_gcaflow.model.backbones.build_backbone (strict load), checked tensor by tensor."
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
            "milestones": None if protocol.gcaflow_milestones is None else list(protocol.gcaflow_milestones),
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
