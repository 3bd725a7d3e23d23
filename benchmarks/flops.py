"""FLOP counting of the benchmarks: GFLOP per image of a whole model and of everything after its backbone."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Where anomalib torch models keep their frozen backbone.
BACKBONE_ATTRIBUTES = ("feature_extractor", "encoder")


def device_of(model: nn.Module) -> torch.device:
    """Return the device of a model's first parameter.

    Args:
        model: The model.

    Returns:
        torch.device: Its device.
    """
    return next(model.parameters()).device


def _gflop(model: nn.Module, image_size: Sequence[int]) -> tuple[float, float]:
    """Count the GFLOP of one image's eval forward, in total and inside the backbone.

    The backbone is the ``feature_extractor`` or ``encoder`` attribute. Counting follows one warm-up forward, so
    per-size constants shared by every image (the folded positional response) are not charged to it.
    """
    images = torch.randn(1, 3, *image_size, device=device_of(model))
    was_training = model.training
    model.eval()
    try:
        # no_grad, not inference_mode: the counter's module tracker hooks parameters' autograd nodes.
        with torch.no_grad():
            model(images)
            with FlopCounterMode(display=False) as counter:
                model(images)
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    backbone = next((name for name in BACKBONE_ATTRIBUTES if isinstance(getattr(model, name, None), nn.Module)), None)
    backbone_flop = sum(counts.get(f"{type(model).__name__}.{backbone}", {}).values()) if backbone else 0
    return counter.get_total_flops() / 1e9, backbone_flop / 1e9


def flow_gflop_per_image(model: nn.Module, image_size: Sequence[int]) -> float:
    """GFLOP (2 per multiply-add) of one image through everything after the backbone, in eval mode.

    Works for a :class:`GCAFlowModel` and for any anomalib torch model that takes normalised images and keeps its
    backbone in a ``feature_extractor`` (or ``encoder``) attribute; without one, the whole forward is counted.
    Only matrix products and convolutions are counted (``torch.utils.flop_counter``); element-wise work,
    interpolation and top-k are not.

    Args:
        model (nn.Module): The torch model (any device; its mode is restored afterwards).
        image_size (Sequence[int]): ``(H, W)`` of the input.

    Returns:
        float: GFLOP per image.
    """
    total, backbone = _gflop(model, image_size)
    return total - backbone


def model_gflop_per_image(model: nn.Module, image_size: Sequence[int]) -> float:
    """GFLOP of one image through the whole model, backbone included (see :func:`flow_gflop_per_image`).

    Args:
        model (nn.Module): The torch model.
        image_size (Sequence[int]): ``(H, W)`` of the input.

    Returns:
        float: GFLOP per image.
    """
    return _gflop(model, image_size)[0]
