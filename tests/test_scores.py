"""Image scores that never saturate, a normalisation that never ties, and a schedule that follows the budget."""

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.post_processing import PostProcessor

from anomalib_gcaflow import GCAFlow
from anomalib_gcaflow.model.anomaly_map import AnomalyMapGenerator
from anomalib_gcaflow.model.post_processor import RankPreservingPostProcessor
from anomalib_gcaflow.model.schedule import budget_schedule, warmup_step_factor

SIZE = (64, 64)


def _latents(spread: float, images: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """Latents whose per-pixel log-likelihoods spread over about ``spread`` nats, fp64."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(images, c, s, s, generator=generator, dtype=torch.float64) * spread**0.5
        + torch.rand(images, 1, 1, 1, generator=generator, dtype=torch.float64) * spread**0.5
        for c, s in ((8, 16), (16, 8), (32, 4))
    ]


def _log_likelihood_map(latents: list[torch.Tensor]) -> torch.Tensor:
    """``L = sum_i Up(-0.5 mean_c z_i^2)``, written out independently, ``(B, 1, H, W)`` fp64."""
    return sum(
        F.interpolate(-0.5 * z.square().mean(1, keepdim=True), size=SIZE, mode="bilinear", align_corners=True)
        for z in latents
    )


def _msflow_score(latents: list[torch.Tensor], top_k: float = 0.03) -> torch.Tensor:
    """MSFlow's formula, written out independently: mean of the top-K of ``1 - exp(L - max L)``, fp64."""
    log_product = _log_likelihood_map(latents).flatten(1)
    multiplicative = 1 - torch.exp(log_product - log_product.amax(1, keepdim=True))
    return multiplicative.topk(int(top_k * SIZE[0] * SIZE[1]), dim=1).values.mean(1)


def test_score_is_minus_log_one_minus_msflow_score() -> None:
    latents = _latents(spread=2.0)
    ours = AnomalyMapGenerator()(latents, SIZE)[1]
    msflow = _msflow_score(latents)
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, -torch.log1p(-msflow), rtol=1e-9, atol=0)
    # The same order on every image.
    assert torch.equal(ours.argsort(), msflow.argsort())


def test_score_keeps_images_apart_where_msflow_saturates() -> None:
    latents = [z.float() for z in _latents(spread=400.0)]
    msflow = _msflow_score([z.double() for z in latents]).float()
    ours = AnomalyMapGenerator()(latents, SIZE)[1]
    assert len(torch.unique(msflow)) < 4, "the test needs latents on which MSFlow's fp32 score saturates"
    assert len(torch.unique(ours)) == len(ours)
    assert torch.isfinite(ours).all()


def test_likelihood_scoring_is_the_absolute_negative_log_likelihood() -> None:
    latents = _latents(spread=2.0)
    anomaly_map, score = AnomalyMapGenerator(image_score="likelihood", pixel_map="likelihood")(latents, SIZE)
    log_likelihood = _log_likelihood_map(latents)
    assert torch.allclose(anomaly_map, -log_likelihood, rtol=1e-12, atol=0)
    k = int(0.03 * SIZE[0] * SIZE[1])
    least_likely = log_likelihood.flatten(1).sort(dim=1).values[:, :k]
    assert torch.allclose(score, -least_likely.exp().mean(1).log(), rtol=1e-9, atol=0)
    assert (anomaly_map >= 0).all()
    assert (score >= 0).all()


def test_likelihood_scoring_compares_images_without_their_own_maximum() -> None:
    # The second image is the first with every latent 1.5x larger, so each of its pixels is less likely. MSFlow's
    # map measures each image from its own most likely pixel (0 there in both); the absolute one ranks every pixel
    # and the score of the second image above the first's.
    latents = [torch.cat([z[:1], 1.5 * z[:1]]) for z in _latents(spread=2.0)]
    msflow_map = AnomalyMapGenerator()(latents, SIZE)[0]
    likelihood_map, likelihood_score = AnomalyMapGenerator(image_score="likelihood", pixel_map="likelihood")(
        latents, SIZE
    )
    assert msflow_map[0].min() == msflow_map[1].min() == 0
    assert (likelihood_map[1] > likelihood_map[0]).all()
    assert likelihood_score[1] > likelihood_score[0]


def test_image_score_and_pixel_map_choose_independently() -> None:
    latents = _latents(spread=2.0)
    paper_map, paper_score = AnomalyMapGenerator()(latents, SIZE)
    likelihood_map, likelihood_score = AnomalyMapGenerator(image_score="likelihood", pixel_map="likelihood")(
        latents, SIZE
    )
    mixed_map, mixed_score = AnomalyMapGenerator(image_score="likelihood")(latents, SIZE)
    assert torch.equal(mixed_map, paper_map)
    assert torch.equal(mixed_score, likelihood_score)
    assert torch.equal(AnomalyMapGenerator(pixel_map="likelihood")(latents, SIZE)[1], paper_score)
    assert not torch.equal(likelihood_map, paper_map)


def test_scale_statistics_are_tracked_like_batchnorm_running_statistics() -> None:
    generator = AnomalyMapGenerator(image_score="standardized")
    first, second = _latents(spread=2.0, seed=1), _latents(spread=3.0, seed=2)

    def per_scale(latents: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        values = [-0.5 * z.square().mean(1) for z in latents]
        return torch.stack([v.mean() for v in values]), torch.stack([v.var() for v in values])

    generator.track(first)
    mean, variance = per_scale(first)
    assert torch.allclose(generator.running_mean.double(), mean, rtol=1e-6)
    assert torch.allclose(generator.running_var.double(), variance, rtol=1e-6)
    generator.track(second)
    mean2, variance2 = per_scale(second)
    assert torch.allclose(generator.running_mean.double(), 0.9 * mean + 0.1 * mean2, rtol=1e-6)
    assert torch.allclose(generator.running_var.double(), 0.9 * variance + 0.1 * variance2, rtol=1e-6)
    assert int(generator.num_batches_tracked) == 2
    with pytest.raises(ValueError, match="expected 3 latents"):
        generator.track(first[:2])


def _halved_and_bounded(standardized: torch.Tensor) -> torch.Tensor:
    """``u / (1 + |u|)`` with ``u = s / 2``, written out independently."""
    return (standardized / 2) / (1 + (standardized / 2).abs())


@pytest.mark.parametrize(("scoring", "transform"), [("standardized", lambda s: s), ("bounded", _halved_and_bounded)])
def test_tracked_scorings_put_each_scale_in_units_of_its_training_spread(
    scoring: str, transform: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    generator = AnomalyMapGenerator(image_score=scoring, pixel_map=scoring).double()
    latents = _latents(spread=2.0)
    with pytest.raises(ValueError, match=f"'{scoring}' scoring needs each scale's log-likelihood statistics"):
        generator(latents, SIZE)
    generator.track(_latents(spread=2.0, seed=3))
    anomaly_map, score = generator(latents, SIZE)
    expected = sum(
        F.interpolate(
            transform(
                (-0.5 * z.square().mean(1, keepdim=True) - generator.running_mean[i])
                / (generator.running_var[i] + 1e-6).sqrt()
            ),
            size=SIZE,
            mode="bilinear",
            align_corners=True,
        )
        for i, z in enumerate(latents)
    )
    assert torch.allclose(anomaly_map, -expected, rtol=1e-12, atol=1e-12)
    k = int(0.03 * SIZE[0] * SIZE[1])
    least_likely = expected.flatten(1).sort(dim=1).values[:, :k]
    assert torch.allclose(score, -least_likely.exp().mean(1).log(), rtol=1e-9, atol=0)
    # The statistics reach no other scoring, and never change an image's value with its batch.
    assert torch.equal(
        AnomalyMapGenerator(image_score="likelihood").double()(latents, SIZE)[1],
        AnomalyMapGenerator(image_score="likelihood").double()(latents, SIZE)[1],
    )
    assert torch.equal(generator([z[:3] for z in latents], SIZE)[1], score[:3])


def test_bounded_map_adds_less_than_one_per_scale_however_unlikely_the_pixel() -> None:
    # The standardised map of the same latents, scaled up 30x, reaches thousands of standard deviations.
    bounded = AnomalyMapGenerator(pixel_map="bounded").double()
    bounded.track(_latents(spread=2.0, seed=3))
    standardized = AnomalyMapGenerator(pixel_map="standardized").double()
    standardized.load_state_dict(bounded.state_dict())
    extreme = [30 * z for z in _latents(spread=2.0)]
    assert bounded(extreme, SIZE)[0].abs().max() < len(extreme)
    assert standardized(extreme, SIZE)[0].abs().max() > 1000


def test_bounded_map_orders_one_scale_as_the_standardized_map_and_keeps_fp32_values_apart() -> None:
    # One scale at the input's resolution, so the upsampling is the identity and only the bound acts. Its pixels
    # reach a few hundred standard deviations below normal, where a logistic or Gaussian bound is flat in fp32.
    torch.manual_seed(0)
    generator = AnomalyMapGenerator(pixel_map="bounded", num_scales=1)
    generator.track([torch.randn(4, 8, 16, 16)])
    latent = torch.randn(1, 8, 16, 16) * torch.logspace(0, 1, 256).reshape(1, 1, 16, 16)
    bounded = generator([latent], (16, 16))[0].flatten()
    generator.pixel_map = "standardized"
    standardized = generator([latent], (16, 16))[0].flatten()
    assert standardized.max() > 200
    assert torch.equal(bounded.argsort(), standardized.argsort())
    assert len(bounded.unique()) == len(standardized.unique()) == 256
    assert len(torch.sigmoid(standardized / 2).unique()) < 256


def test_training_tracks_the_statistics_and_old_checkpoints_still_load() -> None:
    model = GCAFlow(backbone="tf_efficientnet_lite0", pre_trained=False, image_size=(64, 64), depths=(1, 1, 1))
    generator = model.model.anomaly_map_generator
    images = torch.rand(2, 3, 64, 64)
    model.model.train()(images)
    assert int(generator.num_batches_tracked) == 1 and not torch.equal(generator.running_var, torch.ones(3))
    model.model.eval()(images)
    assert int(generator.num_batches_tracked) == 1
    state = {
        key: value
        for key, value in model.state_dict().items()
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")) or "anomaly_map" not in key
    }
    old = GCAFlow(backbone="tf_efficientnet_lite0", pre_trained=False, image_size=(64, 64), depths=(1, 1, 1))
    old.load_state_dict(state)
    assert int(old.model.anomaly_map_generator.num_batches_tracked) == 0


@pytest.mark.parametrize("option", ["image_score", "pixel_map"])
def test_scoring_options_are_validated_and_reach_the_generator(option: str) -> None:
    with pytest.raises(
        ValueError, match=rf"{option} must be one of \['msflow', 'likelihood', 'standardized', 'bounded'\], got 'nll'"
    ):
        AnomalyMapGenerator(**{option: "nll"})
    model = GCAFlow(
        backbone="tf_efficientnet_lite0",
        pre_trained=False,
        image_size=(64, 64),
        depths=(1, 1, 1),
        **{option: "likelihood"},
    )
    assert getattr(model.model.anomaly_map_generator, option) == "likelihood"
    assert model.hparams[option] == "likelihood"
    assert GCAFlow(backbone="tf_efficientnet_lite0", pre_trained=False, depths=(1, 1, 1)).hparams[option] == "msflow"


def test_post_processor_preserves_rank_and_threshold() -> None:
    post, stock = RankPreservingPostProcessor(), PostProcessor()
    for processor in (post, stock):
        processor.image_min.fill_(10.0)
        processor.image_max.fill_(20.0)
        processor._image_threshold.fill_(12.0)
    scores = torch.tensor([-1e6, 0.0, 9.0, 10.0, 11.0, 12.0, 13.0, 17.5, 20.0, 30.0, 1e3, 1e5])
    ours = post._normalize(scores, post.image_min, post.image_max, post.image_threshold)
    theirs = stock._normalize(scores, stock.image_min, stock.image_max, stock.image_threshold)
    assert len(torch.unique(theirs)) < len(scores), "anomalib's clamp ties scores outside the range"
    assert (ours.diff() > 0).all()
    assert ((ours > 0) & (ours < 1)).all()
    assert ours[scores == 12.0].item() == 0.5
    # Same labels at the default sensitivity, and the same slope at the threshold.
    assert torch.equal(ours > post.normalized_image_threshold, theirs > stock.normalized_image_threshold)
    near = torch.tensor([12.0, 12.01])
    slope = post._normalize(near, post.image_min, post.image_max, post.image_threshold).diff() / 0.01
    assert slope.item() == pytest.approx(0.1, rel=1e-2)


def test_post_processor_keeps_anomalib_values_without_a_range() -> None:
    post, stock = RankPreservingPostProcessor(), PostProcessor()
    scores = torch.tensor([1.0, 5.0, 9.0])
    nan = torch.tensor(float("nan"))
    # Before validation: the raw scores, as anomalib returns them.
    assert torch.equal(post._normalize(scores, nan, nan, nan), scores)
    # A constant validation output: anomalib's 0 / 0.5 / 1 labelling.
    five = torch.tensor(5.0)
    expected = stock._normalize(scores, five, five, five)
    assert torch.equal(post._normalize(scores, five, five, five), expected)
    assert expected.tolist() == [0.0, 0.5, 1.0]


def test_gcaflow_uses_the_rank_preserving_post_processor() -> None:
    model = GCAFlow(backbone="tf_efficientnet_lite0", pre_trained=False, image_size=(64, 64), depths=(1, 1, 1))
    assert isinstance(model.post_processor, RankPreservingPostProcessor)


def test_schedule_follows_the_budget() -> None:
    assert budget_schedule(100) == (12, (70, 90))
    assert budget_schedule(20) == (2, (14, 18))
    assert budget_schedule(5) == (1, (4, 5))
    assert budget_schedule(1) == (0, (1, 1))
    assert budget_schedule(20, warmup_epochs=0, milestones=(10,)) == (0, (10,))
    # 100 epochs is exactly the paper's schedule.
    warmup, milestones = budget_schedule(100)
    rates = [1e-4 * warmup_step_factor(e, warmup, milestones, 0.33) for e in (0, 12, 70, 90)]
    assert rates == pytest.approx([1e-5, 1e-4, 3.3e-5, 1.089e-5])
    with pytest.raises(ValueError, match="budget"):
        budget_schedule(0)


@pytest.mark.parametrize(("model_epochs", "trainer_epochs", "budget"), [(100, 20, 20), (5, 50, 5), (None, 8, 8)])
def test_gcaflow_schedule_budget_is_the_smaller_limit(
    model_epochs: int | None,
    trainer_epochs: int,
    budget: int,
) -> None:
    model = GCAFlow(
        backbone="tf_efficientnet_lite0",
        pre_trained=False,
        image_size=(64, 64),
        depths=(1, 1, 1),
        lr=1.0,
        max_epochs=model_epochs,
    )

    class _Trainer:
        max_epochs = trainer_epochs

    model._trainer = _Trainer()
    assert model.epoch_budget == budget
    _, [scheduler] = model.configure_optimizers()
    warmup, milestones = budget_schedule(budget)
    expected = [warmup_step_factor(e, warmup, milestones, 0.33) for e in range(budget)]
    seen = []
    for _ in range(budget):
        seen.append(scheduler.get_last_lr()[0])
        scheduler.step()
    assert seen == pytest.approx(expected)
    assert math.isclose(seen[-1], 0.33 ** sum(budget - 1 >= m for m in milestones))
