"""GCAFlowModel, post-processing, loss and schedule: behaviour on real images and the paper's numbers."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import normalize, pil_to_tensor, resize

from anomalib_gcaflow import FlowConfig, GCAFlow
from anomalib_gcaflow.model.anomaly_map import AnomalyMapGenerator
from anomalib_gcaflow.model.backbones import backbone_normalization
from anomalib_gcaflow.model.loss import GCAFlowLoss
from anomalib_gcaflow.model.schedule import warmup_step_factor
from anomalib_gcaflow.model.torch_model import GCAFlowModel

LITE0 = "tf_efficientnet_lite0"


def _real_images(folder: Path, count: int, size: int) -> torch.Tensor:
    """Load ``count`` real images, resized and normalised as GCAFlow's pre-processor does for Lite0."""
    mean, std = backbone_normalization(LITE0)
    paths = sorted(folder.glob("*.png"))[:count]
    images = [pil_to_tensor(Image.open(p).convert("RGB")).float() / 255 for p in paths]
    batch = resize(torch.stack(images), [size, size], antialias=True)
    return normalize(batch, list(mean), list(std))


def test_top_k_is_three_percent_of_the_pixels() -> None:
    assert AnomalyMapGenerator().num_top_pixels((512, 512)) == 7864
    assert AnomalyMapGenerator().num_top_pixels((256, 256)) == 1966


def test_maps_are_per_image_and_in_range() -> None:
    generator = torch.Generator().manual_seed(0)
    latents = [torch.randn(4, c, s, s, generator=generator) * 2 for c, s in ((8, 16), (16, 8), (32, 4))]
    anomaly_map, score = AnomalyMapGenerator()(latents, (64, 64))
    assert anomaly_map.shape == (4, 1, 64, 64)
    assert score.shape == (4,)
    assert (anomaly_map >= 0).all()
    assert torch.allclose(anomaly_map.flatten(1).amin(dim=1), torch.zeros(4))
    assert (score > 0).all()
    # Image 2 alone, and image 2 next to other images, give the same map and score.
    alone = AnomalyMapGenerator()([z[2:3] for z in latents], (64, 64))
    assert torch.equal(alone[0], anomaly_map[2:3])
    assert torch.equal(alone[1], score[2:3])


def test_model_is_batch_independent_on_real_images(mvtec_root: Path) -> None:
    torch.manual_seed(0)
    model = GCAFlowModel(backbone=LITE0, depths=(1, 1, 1), expansion=1).eval()
    images = _real_images(mvtec_root / "bottle" / "test" / "broken_large", 3, 128)
    with torch.no_grad():
        together = model(images)
        alone = model(images[1:2])
        reordered = model(images.flip(0))
    assert torch.allclose(alone.pred_score, together.pred_score[1:2], atol=1e-6)
    assert torch.allclose(alone.anomaly_map, together.anomaly_map[1:2], atol=1e-5)
    assert torch.allclose(reordered.anomaly_map.flip(0), together.anomaly_map, atol=1e-5)


def test_offline_backbone_forward_on_real_images_gives_finite_maps_of_input_size(mvtec_root: Path) -> None:
    torch.manual_seed(0)
    model = GCAFlowModel(backbone=LITE0).eval()
    images = _real_images(mvtec_root / "bottle" / "test" / "contamination", 2, 160)
    with torch.no_grad():
        output = model(images)
    assert output.anomaly_map.shape == (2, 1, 160, 160)
    assert torch.isfinite(output.anomaly_map).all() and torch.isfinite(output.pred_score).all()


def test_short_training_on_real_good_images_lowers_the_loss(mvtec_root: Path) -> None:
    torch.manual_seed(0)
    model = GCAFlowModel(backbone=LITE0, depths=(1, 2, 2), expansion=2)
    images = _real_images(mvtec_root / "bottle" / "train" / "good", 16, 128)
    features = model.extract_features(images)
    optimizer = torch.optim.Adam(model.flow.parameters(), lr=1e-3)
    loss_function = GCAFlowLoss()
    losses = []
    model.train()
    for _ in range(12):
        latents, log_det = model(images, features=features)
        loss = loss_function(latents, log_det)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.flow.parameters(), 2.0)
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    # The flow starts from standardised features (data_init), so the gain is measured per latent dimension.
    first, last = (GCAFlowLoss.per_dimension(torch.tensor(losses[i]), latents).item() for i in (0, -1))
    assert last < first - 0.1


def test_backbone_is_frozen_and_only_the_flow_trains() -> None:
    model = GCAFlowModel(backbone=LITE0, pre_trained=False, depths=(1, 1, 1)).train()
    assert not model.feature_extractor.training
    assert not any(p.requires_grad for p in model.feature_extractor.parameters())
    assert all(p.requires_grad for p in model.flow.parameters() if p.dtype.is_floating_point and p.ndim == 1)


def test_gcaflow_gathers_its_flat_flow_options_into_one_config() -> None:
    model = GCAFlow(backbone=LITE0, pre_trained=False, depths=[1, 1, 1], expansion=2, attention="eca", data_init=False)
    assert model.model.flow.config == FlowConfig(depths=(1, 1, 1), expansion=2, attention="eca", data_init=False)
    # The CLI's and the checkpoints' keys stay the flat arguments.
    assert model.hparams.depths == [1, 1, 1]
    assert model.hparams.attention == "eca"
    with pytest.raises(ValueError, match=r"either in flow_config or as keywords, not both: got \['depths'\]"):
        GCAFlowModel(backbone=LITE0, pre_trained=False, flow_config=FlowConfig(), depths=(1, 1, 1))


def test_loss_is_msflow_nll() -> None:
    latents = [torch.full((2, 4, 2, 2), 2.0), torch.ones(2, 8, 1, 1)]
    log_det = torch.tensor([1.0, 3.0])
    # 0.5 * (16 * 4 + 8) - log_det = 36 - log_det
    assert torch.allclose(GCAFlowLoss.per_image(latents, log_det), torch.tensor([35.0, 33.0]))
    assert GCAFlowLoss()(latents, log_det).item() == pytest.approx(34.0)
    assert GCAFlowLoss.per_dimension(torch.tensor(24.0), latents).item() == pytest.approx(1.0 + 0.9189385, abs=1e-6)


def test_msflow_learning_rate_schedule() -> None:
    def lr(epoch: int) -> float:
        return 1e-4 * warmup_step_factor(epoch, warmup_epochs=12, milestones=(70, 90), gamma=0.33)

    assert lr(0) == pytest.approx(1e-5)
    assert lr(1) == pytest.approx(1.75e-5)
    assert all(lr(e) == pytest.approx(1e-4) for e in (12, 40, 69))
    assert all(lr(e) == pytest.approx(3.3e-5) for e in (70, 89))
    assert all(lr(e) == pytest.approx(1.089e-5) for e in (90, 99))
    assert warmup_step_factor(0, warmup_epochs=0, milestones=(), gamma=0.5) == 1.0


def test_feature_noise_blurs_only_training_inputs_at_each_channels_scale() -> None:
    """Training inputs get noise at the requested fraction of each channel's spread; eval outputs are untouched."""
    options = {"backbone": "tf_efficientnet_lite0", "pre_trained": False, "depths": (1, 1, 1), "data_init": False}
    model, noisy = GCAFlowModel(**options), GCAFlowModel(**options, feature_noise=0.1)
    noisy.load_state_dict(model.state_dict())
    features = [torch.randn(4, c, 8, 8) * (1 + c) for c in model.feature_extractor.channels]
    images = torch.zeros(4, 3, 64, 64)
    with torch.no_grad():
        for feature in features:
            added = noisy._add_noise(feature) - feature
            ratio = added.std(dim=(0, 2, 3)) / feature.std(dim=(0, 2, 3), correction=0)
            assert torch.allclose(ratio, torch.full_like(ratio, 0.1), rtol=0.3)
        model.train(), noisy.train()
        clean, _ = model(images, features=features)
        first, _ = noisy(images, features=features)
        second, _ = noisy(images, features=features)
        assert not torch.equal(first[0], clean[0]) and not torch.equal(first[0], second[0])
        model.eval(), noisy.eval()
        assert torch.equal(model(images, features=features).anomaly_map, noisy(images, features=features).anomaly_map)
    with pytest.raises(ValueError, match="feature_noise"):
        GCAFlowModel(**options, feature_noise=-0.1)
