"""Numerics: finite losses, gradients, scores and maps on extreme images, in fp32 and under CPU bf16 autocast.

The log-determinant and negative log-likelihood reductions stay in fp32.
"""

from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import normalize, pil_to_tensor

from anomalib_gcaflow import FlowConfig, GCAFlowModel, MultiScaleFlow
from anomalib_gcaflow.model.backbones import backbone_normalization
from anomalib_gcaflow.model.flow.reduction import sum_per_sample
from anomalib_gcaflow.model.loss import GCAFlowLoss

LITE0 = "tf_efficientnet_lite0"
SIZE = 64
PRECISIONS = pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])


def _read(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return pil_to_tensor(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)).float() / 255


def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean, std = backbone_normalization(LITE0)
    return normalize(images, list(mean), list(std))


@pytest.fixture(scope="module")
def extreme_images(mvtec_root: Path) -> tuple[list[str], torch.Tensor]:
    """Names and a normalised batch of constant, saturated, near-constant and strongly anomalous images."""
    real = _read(mvtec_root / "bottle" / "test" / "broken_large" / "000.png")
    generator = torch.Generator().manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    images = {
        "all 0": torch.zeros(3, SIZE, SIZE),
        "all 255": torch.ones(3, SIZE, SIZE),
        "constant grey": torch.full((3, SIZE, SIZE), 0.5),
        "near-zero variance": 0.5 + 1e-6 * torch.randn(3, SIZE, SIZE, generator=generator),
        "uniform noise": torch.rand(3, SIZE, SIZE, generator=generator),
        "1-pixel checkerboard": ((rows + cols) % 2).float().expand(3, -1, -1),
        "saturated colour": torch.tensor([1.0, 0.0, 1.0])[:, None, None].expand(3, SIZE, SIZE),
        "real defect": real,
        "inverted defect": 1 - real,
    }
    return list(images), _normalise(torch.stack(list(images.values())))


@pytest.fixture(scope="module")
def trained_model(mvtec_root: Path) -> GCAFlowModel:
    """GCAFlowModel after 20 Adam steps on 8 real normal images, so its weights are away from their start."""
    torch.manual_seed(0)
    model = GCAFlowModel(backbone=LITE0, depths=(1, 1, 1), expansion=1)
    paths = sorted((mvtec_root / "bottle" / "train" / "good").glob("*.png"))[:8]
    features = model.extract_features(_normalise(torch.stack([_read(p) for p in paths])))
    optimizer = torch.optim.Adam(model.flow.parameters(), lr=1e-3)
    loss_function = GCAFlowLoss()
    model.train()
    for _ in range(20):
        optimizer.zero_grad()
        loss_function(*model(None, features=features)).backward()
        torch.nn.utils.clip_grad_norm_(model.flow.parameters(), 2.0)
        optimizer.step()
    return model


@PRECISIONS
def test_loss_and_gradients_are_finite_on_extreme_images(
    trained_model: GCAFlowModel,
    extreme_images: tuple[list[str], torch.Tensor],
    autocast: bool,
) -> None:
    names, images = extreme_images
    trained_model.train()
    trained_model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        latents, log_det = trained_model(images)
        per_image = GCAFlowLoss.per_image(latents, log_det)
    assert log_det.dtype == per_image.dtype == torch.float32
    not_finite = [name for name, value in zip(names, per_image, strict=True) if not torch.isfinite(value)]
    assert not not_finite
    per_image.mean().backward()
    gradients = [p.grad for p in trained_model.flow.parameters() if p.grad is not None]
    assert gradients
    assert all(torch.isfinite(g).all() for g in gradients)
    trained_model.zero_grad()


@PRECISIONS
def test_scores_and_maps_are_finite_on_extreme_images(
    trained_model: GCAFlowModel,
    extreme_images: tuple[list[str], torch.Tensor],
    autocast: bool,
) -> None:
    names, images = extreme_images
    trained_model.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        output = trained_model(images)
    assert output.pred_score.dtype == output.anomaly_map.dtype == torch.float32
    assert output.anomaly_map.shape == (len(names), 1, SIZE, SIZE)
    not_finite = [
        name
        for name, score, anomaly_map in zip(names, output.pred_score, output.anomaly_map, strict=True)
        if not (torch.isfinite(score) and torch.isfinite(anomaly_map).all())
    ]
    assert not not_finite
    assert (output.anomaly_map >= 0).all()
    assert (output.pred_score >= 0).all()  # nats: -log(1 - s) of MSFlow's s in [0, 1]


@PRECISIONS
def test_flow_is_finite_on_zero_variance_and_huge_features(autocast: bool) -> None:
    torch.manual_seed(0)
    flow = MultiScaleFlow((8, 8, 8), FlowConfig(depths=(1, 1, 1), kernel_size=3, expansion=1, pos_embed_dim=8))
    sizes = ((8, 8), (4, 4), (2, 2))
    cases = {
        # Every channel equal at every pixel: the subnets' channel LayerNorm sees zero variance.
        "zeros": [torch.zeros(2, 8, *s) for s in sizes],
        "constant": [torch.full((2, 8, *s), 3.0) for s in sizes],
        # Far outside anything a frozen backbone gives for a real image.
        "huge": [torch.full((2, 8, *s), 1e4) * torch.linspace(-1, 1, 8)[:, None, None] for s in sizes],
    }
    for name, features in cases.items():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            latents, log_det = flow(features)
            loss = GCAFlowLoss()(latents, log_det)
        assert log_det.dtype == loss.dtype == torch.float32, name
        assert all(torch.isfinite(z).all() for z in latents), name
        assert torch.isfinite(log_det).all(), name
        assert torch.isfinite(loss), name


def test_per_sample_sums_accumulate_in_fp32_where_bf16_would_lose_the_total() -> None:
    # 100,000 log-scales of 0.01 (bf16 stores 0.010009765625): about one 256x256 image's worth of terms.
    terms = torch.full((2, 100_000), 0.01, dtype=torch.bfloat16)
    exact = 100_000 * 0.010009765625
    assert abs(terms.sum(dim=1)[0].item() - exact) > 0.5  # a bf16 result cannot even hold the total
    total = sum_per_sample(terms)
    assert total.dtype == torch.float32
    assert torch.allclose(total, torch.full((2,), exact), rtol=1e-6)
    # The loss takes the same path: bf16 latents and a fp32 log-determinant give a fp32 loss.
    latents = [torch.full((2, 4, 64, 64), 0.5, dtype=torch.bfloat16)]
    loss = GCAFlowLoss.per_image(latents, torch.zeros(2))
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, torch.full((2,), 0.5 * 0.25 * 4 * 64 * 64))


def test_log_det_under_autocast_stays_close_to_fp32(trained_model: GCAFlowModel, mvtec_root: Path) -> None:
    paths = sorted((mvtec_root / "bottle" / "test" / "good").glob("*.png"))[:2]
    images = _normalise(torch.stack([_read(p) for p in paths]))
    trained_model.eval()
    with torch.inference_mode():
        features = trained_model.extract_features(images)
        _, log_det = trained_model.flow(features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, log_det_bf16 = trained_model.flow(features)
    assert log_det_bf16.dtype == torch.float32
    # bf16 keeps ~3 significant digits per term; summed in fp32 the total keeps about as many.
    assert torch.allclose(log_det_bf16, log_det, rtol=2e-2)
