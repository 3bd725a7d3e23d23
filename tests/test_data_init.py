"""The flow's data-dependent start: ActNorm from the first training batch, couplings at the identity."""

import torch

from anomalib_gcaflow.model.flow import FlowConfig, MultiScaleFlow
from anomalib_gcaflow.model.flow.actnorm import ActNorm

CHANNELS = (4, 6, 8)
SIZES = ((8, 8), (4, 4), (2, 2))


def _features(batch: int = 5, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        3.0 + 6.0 * torch.randn(batch, c, *size, generator=generator, dtype=torch.float64)
        for c, size in zip(CHANNELS, SIZES, strict=True)
    ]


def test_actnorm_standardises_its_first_training_batch_only() -> None:
    norm = ActNorm(3).double()
    x = 2.0 + 5.0 * torch.randn(4, 3, 6, 6, dtype=torch.float64)
    (y,), log_det = norm((x,))
    assert bool(norm.initialized)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(log_det, -36 * norm.log_std.sum().expand(4))
    # Later batches, and the inverse, use the same affine.
    shift = norm.shift.detach().clone()
    norm((x + 100,))
    assert torch.equal(norm.shift, shift)
    (back,), back_log_det = norm((y,), rev=True)
    assert torch.allclose(back, x, atol=1e-12)
    assert torch.allclose(back_log_det, -log_det)


def test_actnorm_is_the_identity_until_trained_and_keeps_its_state() -> None:
    norm = ActNorm(3).eval()
    x = torch.randn(2, 3, 4, 4)
    (y,), log_det = norm((x,))
    assert torch.equal(y, x) and not bool(norm.initialized) and torch.equal(log_det, torch.zeros(2))
    trained = ActNorm(3)
    trained((5 * x,))
    restored = ActNorm(3)
    restored.load_state_dict(trained.state_dict())
    restored((x,))  # a loaded, initialised ActNorm is not initialised again
    assert torch.equal(restored.log_std, trained.log_std)


def test_untrained_flow_is_the_standardisation() -> None:
    torch.manual_seed(0)
    flow = MultiScaleFlow(CHANNELS, FlowConfig(depths=(1, 2, 1), pos_embed_dim=4)).double()
    features = _features()
    latents, log_det = flow(features)
    expected_log_det = 0.0
    for z, x, stack, permutation in zip(latents, features, flow.stacks, flow.permutations, strict=True):
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        expected = (x - mean) / std
        for block in stack:  # each block ends with its global affine (1 and 0 at the start) and a permutation
            expected = expected[:, block.permutation]
        assert torch.allclose(z, expected[:, permutation.permutation], atol=1e-10)
        expected_log_det = expected_log_det - x.shape[2] * x.shape[3] * std.log().sum()
    # Couplings at the identity contribute nothing beyond their global scales, which start at 1.
    assert torch.allclose(log_det, expected_log_det.expand(5), atol=1e-8)


def test_data_init_flow_inverts_exactly_after_training_steps() -> None:
    torch.manual_seed(0)
    flow = MultiScaleFlow(CHANNELS, FlowConfig(depths=(1, 1, 1), pos_embed_dim=4)).double()
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for step in range(3):
        latents, log_det = flow(_features(seed=step))
        loss = (0.5 * sum(z.square().sum(dim=(1, 2, 3)) for z in latents) - log_det).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    flow.eval()
    features = _features(seed=9)
    latents, log_det = flow(features)
    restored, reverse_log_det = flow(latents, rev=True)
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(restored, features, strict=True))
    assert torch.allclose(reverse_log_det, -log_det, atol=1e-8)


def test_paper_initialisation_has_no_actnorm() -> None:
    flow = MultiScaleFlow(CHANNELS, FlowConfig(depths=(1, 1, 1), pos_embed_dim=4, data_init=False))
    assert flow.input_norms is None
    assert any(block.subnet[-1].weight.abs().sum() > 0 for stack in flow.stacks for block in stack)
