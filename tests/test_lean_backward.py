"""The lean backward passes give exactly torch's gradients: alone, through the whole flow, and never in export."""

from collections.abc import Callable

import pytest
import torch

from anomalib_gcaflow.model.flow import FlowConfig, MultiScaleFlow, lean_backward
from anomalib_gcaflow.model.flow.lean_backward import clamp_latents, permute_channels


def _gradient(
    function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    y = function(x)
    (y * weight).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_channels_matches_indexing_and_its_gradient(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 4, 5, generator=generator).to(dtype)
    weight = torch.randn(3, 7, 4, 5, generator=generator).to(dtype)
    index = torch.randperm(7, generator=generator)
    lean = _gradient(lambda t: permute_channels(t, index, torch.argsort(index)), x, weight)
    plain = _gradient(lambda t: t[:, index], x, weight)
    assert lean[1].dtype == dtype
    for ours, torchs in zip(lean, plain, strict=True):
        assert torch.equal(ours, torchs)


@pytest.mark.parametrize(
    "values",
    [
        [0.5, -3.0, 2.0, 0.0],  # nothing clamped: the gradient passes unchanged
        [0.5, -30.0, 20.0, 10.0],  # beyond the limit on both sides, and at it (zero gradient there too)
        [0.5, float("nan"), 1.0, -1.0],  # NaN takes clamp's own (zero) gradient
        [float("inf"), float("-inf"), 1.0, -1.0],
    ],
)
def test_clamp_latents_matches_clamp_and_its_gradient(values: list[float]) -> None:
    x = torch.tensor(values).view(1, 4, 1, 1)
    weight = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    lean = _gradient(lambda t: clamp_latents(t, 10.0), x, weight)
    plain = _gradient(lambda t: t.clamp(-10.0, 10.0), x, weight)
    for ours, torchs in zip(lean, plain, strict=True):
        assert torch.equal(ours.isnan(), torchs.isnan())
        assert torch.equal(ours.nan_to_num(0.0), torchs.nan_to_num(0.0))


def test_flow_gradients_are_bitwise_those_of_plain_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every parameter's gradient and the loss of a training step are identical with and without the shortcuts."""

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        flow = MultiScaleFlow([4, 6, 8], FlowConfig(depths=(1, 2, 1), pos_embed_dim=8, data_init=False))
        generator = torch.Generator().manual_seed(1)
        features = [torch.randn(2, c, s, s, generator=generator) for c, s in ((4, 8), (6, 4), (8, 2))]
        latents, log_det = flow(features)
        loss = sum(z.square().sum() for z in latents) - log_det.sum()
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in flow.named_parameters()}

    decisions: list[bool] = []
    decide = lean_backward._lean
    monkeypatch.setattr(lean_backward, "_lean", lambda x: decisions.append(decide(x)) or decisions[-1])
    lean_loss, lean_grads = step()
    # Both shortcuts ran: 4 block permutations, 3 scale permutations, 3 clamps.
    assert decisions == [True] * 10
    monkeypatch.setattr(lean_backward, "_lean", lambda x: False)
    plain_loss, plain_grads = step()
    assert torch.equal(lean_loss, plain_loss)
    assert lean_grads.keys() == plain_grads.keys()
    assert all(torch.equal(lean_grads[name], plain_grads[name]) for name in plain_grads)


def test_shortcuts_stay_out_of_traced_graphs() -> None:
    """TorchScript tracing records plain indexing and clamping, which every exporter can run."""
    index = torch.tensor([2, 0, 1])

    def function(x: torch.Tensor) -> torch.Tensor:
        return clamp_latents(permute_channels(x, index, torch.argsort(index)), 1.0)

    x = torch.randn(1, 3, 2, 2, requires_grad=True)
    graph = str(torch.jit.trace(function, x).graph)
    assert "PythonOp" not in graph
    assert "aten::clamp" in graph
