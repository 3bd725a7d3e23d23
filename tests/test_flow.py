"""Exactness of the flow core: inverse, log-determinant against the autograd Jacobian, sizes, options."""

import dataclasses
import math
from collections.abc import Callable, Sequence

import pytest
import torch
from anomalib.models.image.cflow.utils import positional_encoding_2d as cflow_positional_encoding
from torch import nn

from anomalib_gcaflow.model.flow import (
    FlowConfig,
    FusionAttnFlow,
    HFlowBlock,
    HierarchicalSubnet,
    MultiScaleFlow,
    PointwiseConv2d,
    PositionalConv2d,
    eca_kernel_size,
    positional_encoding_2d,
)

TINY_SIZES = ((4, 4), (2, 2), (1, 1))


def _perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every trainable weight away from its initialisation so no coupling is near the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return module


def _tiny_inputs(channels: Sequence[int] = (4, 4, 4), batch: int = 2, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, c, *size, generator=generator, dtype=torch.float64)
        for c, size in zip(channels, TINY_SIZES, strict=True)
    ]


def _jacobian_log_det(
    function: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]], inputs: list[torch.Tensor]
) -> float:
    """Log-|det| of the full Jacobian of ``function`` at the first sample of ``inputs``."""
    shapes = [t.shape[1:] for t in inputs]
    sizes = [t[0].numel() for t in inputs]

    def flat(vector: torch.Tensor) -> torch.Tensor:
        parts = [p.view(1, *s) for p, s in zip(torch.split(vector, sizes), shapes, strict=True)]
        return torch.cat([t.flatten() for t in function(parts)])

    jacobian = torch.autograd.functional.jacobian(flat, torch.cat([t[0].flatten() for t in inputs]))
    sign, log_abs_det = torch.linalg.slogdet(jacobian)
    assert sign != 0
    return log_abs_det.item()


def _assert_exact(module: nn.Module, inputs: list[torch.Tensor]) -> None:
    """``module`` (FrEIA contract) inverts to 1e-8 and its log-det equals the autograd Jacobian's to 1e-8."""
    outputs, log_det = module(inputs)
    restored, reverse_log_det = module(list(outputs), rev=True)
    for x, x_restored in zip(inputs, restored, strict=True):
        assert torch.allclose(x, x_restored, atol=1e-8, rtol=0)
    assert torch.allclose(log_det, -reverse_log_det, atol=1e-8, rtol=0)
    assert _jacobian_log_det(lambda xs: list(module(xs)[0]), inputs) == pytest.approx(log_det[0].item(), abs=1e-8)
    assert abs(log_det[0].item()) > 1e-3  # a log-det of ~0 would make the comparison vacuous


@pytest.mark.parametrize(
    ("attention", "subnet"),
    [("gca", "hierarchical"), ("se", "msflow"), ("eca", "hierarchical"), ("gca", ("hierarchical", "msflow", "msflow"))],
)
def test_multiscale_flow_is_exactly_invertible_with_exact_log_det(
    attention: str, subnet: str | tuple[str, ...]
) -> None:
    torch.manual_seed(0)
    flow = _perturb(
        MultiScaleFlow(
            (4, 4, 4),
            FlowConfig(
                depths=(2, 2, 3), kernel_size=3, expansion=2, attention=attention, subnet=subnet, pos_embed_dim=4
            ),
        ),
    ).double()
    _assert_exact(flow, _tiny_inputs())


def test_fusion_flow_with_gca_has_exact_inverse_and_log_det() -> None:
    torch.manual_seed(0)
    fusion = _perturb(FusionAttnFlow((4, 4, 4), attention="gca")).double()
    _assert_exact(fusion, _tiny_inputs())


def test_single_hflow_block_is_exact() -> None:
    torch.manual_seed(0)
    block = _perturb(HFlowBlock(4, lambda c_in, c_out: HierarchicalSubnet(c_in, c_out, pos_channels=4, kernel_size=3)))
    block = block.double()
    _assert_exact(block, [torch.randn(2, 4, 3, 3, dtype=torch.float64)])


def test_hflow_block_matches_anomalib_all_in_one_block_numerics() -> None:
    """The gather permutation and fp32 log-det reproduce the vendored block's dense-matrix computation."""
    from anomalib.models.components.flow import AllInOneBlock

    torch.manual_seed(0)
    block = _perturb(HFlowBlock(6, lambda c_in, c_out: HierarchicalSubnet(c_in, c_out, pos_channels=4, kernel_size=3)))
    x = torch.randn(2, 6, 5, 5)
    (y,), log_det = block((x,))
    (y_reference,), log_det_reference = AllInOneBlock.forward(block, (x,))
    assert torch.allclose(y, y_reference, atol=1e-5)
    assert torch.allclose(log_det, log_det_reference, atol=1e-4)


def test_paper_parameter_counts() -> None:
    def trainable(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    paper = {"data_init": False}
    assert trainable(MultiScaleFlow((256, 512, 1024), FlowConfig(**paper))) == 136_202_636
    assert (
        trainable(MultiScaleFlow((256, 512, 1024), FlowConfig(attention="none", subnet="msflow", **paper)))
        == 99_556_224
    )
    # The data-dependent start adds one per-channel shift and scale per scale, nothing else.
    assert trainable(MultiScaleFlow((256, 512, 1024))) == 136_202_636 + 2 * (256 + 512 + 1024)


def test_subnet_per_scale_builds_each_scale_as_its_uniform_flow_would() -> None:
    """A per-scale list gives every scale exactly the stack that the same name for all scales gives it."""

    def stack_shapes(flow: MultiScaleFlow, scale: int) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in flow.stacks[scale].parameters()]

    channels, depths = (8, 8, 16), (1, 2, 1)
    per_scale = ("msflow", "hierarchical", "msflow")
    mixed = MultiScaleFlow(channels, FlowConfig(depths=depths, pos_embed_dim=4, subnet=list(per_scale)))
    assert mixed.config.subnet == per_scale
    uniform = {
        name: MultiScaleFlow(channels, FlowConfig(depths=depths, pos_embed_dim=4, subnet=name)) for name in per_scale
    }
    for scale, name in enumerate(per_scale):
        assert stack_shapes(mixed, scale) == stack_shapes(uniform[name], scale), scale
    assert stack_shapes(mixed, 0) != stack_shapes(uniform["hierarchical"], 0)  # the two subnets differ in shape


def test_attention_switch_changes_only_the_fusion_subnets() -> None:
    def shapes(flow: MultiScaleFlow) -> dict[str, tuple[int, ...]]:
        return {name: tuple(p.shape) for name, p in flow.named_parameters()}

    reference = shapes(MultiScaleFlow((8, 8, 16), FlowConfig(depths=(1, 1, 1), pos_embed_dim=4, attention="none")))
    for attention in ("gca", "eca", "se"):
        variant = shapes(MultiScaleFlow((8, 8, 16), FlowConfig(depths=(1, 1, 1), pos_embed_dim=4, attention=attention)))
        added = set(variant) - set(reference)
        assert added, attention
        assert all(name.startswith(("fusion.subnet_p.attention.", "fusion.subnet_q.attention.")) for name in added)
        assert {k: v for k, v in variant.items() if k in reference} == reference


def test_eca_kernel_size() -> None:
    assert eca_kernel_size(896) == 5
    assert [eca_kernel_size(c) for c in (224, 256, 512, 1024)] == [5, 5, 5, 5]


def test_positional_encoding_equals_cflow() -> None:
    ours = positional_encoding_2d(64, 16, 12)
    assert torch.allclose(ours, cflow_positional_encoding(64, 16, 12), atol=1e-6)
    assert ours[0].std(dim=0).max() == 0  # column code constant along rows
    assert ours[32].std(dim=1).max() == 0  # row code constant along columns


def test_positional_folding_equals_concatenation() -> None:
    torch.manual_seed(0)
    conv = PositionalConv2d(12, 20, 5, pos_channels=64)
    x = torch.randn(3, 12, 9, 7)
    folded = conv(x)
    conv.fold_positional = False
    assert torch.allclose(folded, conv(x), atol=1e-5)
    # The reused response follows in-place weight updates.
    conv.fold_positional = True
    with torch.no_grad():
        first = conv(x)
        conv.weight_pos.add_(1.0)
        second = conv(x)
        conv.fold_positional = False
        assert torch.allclose(second, conv(x), atol=1e-4)
        assert not torch.allclose(first, second)


def test_positional_conv_of_a_coupling_half_matches_the_plain_convolution() -> None:
    # A coupling passes its subnet a strided channel half; on the CPU the module convolves a channels-last copy.
    torch.manual_seed(0)
    conv = PositionalConv2d(12, 20, 5, pos_channels=64)
    whole = torch.randn(3, 24, 9, 7, requires_grad=True)
    half = whole[:, 12:]
    out = conv(half)
    encoding = conv.positional_encoding(half).expand(3, -1, -1, -1)
    weight = torch.cat((conv.weight_x, conv.weight_pos), dim=1)
    reference = torch.nn.functional.conv2d(torch.cat((half, encoding), dim=1), weight, conv.bias, padding=2)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, reference, atol=1e-5)
    upstream = torch.randn_like(reference)
    grads = torch.autograd.grad(out, (whole, conv.weight_x, conv.weight_pos), upstream)
    reference_grads = torch.autograd.grad(reference, (whole, conv.weight_x, conv.weight_pos), upstream)
    for grad, reference_grad in zip(grads, reference_grads, strict=True):
        assert torch.allclose(grad, reference_grad, rtol=1e-4, atol=1e-4)
    assert grads[0][:, :12].abs().max() == 0


@pytest.mark.parametrize("channels_last", [True, False])
def test_pointwise_conv_matches_the_convolution_and_loads_its_weights(channels_last: bool) -> None:
    torch.manual_seed(0)
    reference = nn.Conv2d(40, 6, 1)
    pointwise = PointwiseConv2d(40, 6)
    pointwise.load_state_dict(reference.state_dict())  # same keys and shapes as nn.Conv2d
    x = torch.randn(3, 40, 9, 7)
    x = (x.contiguous(memory_format=torch.channels_last) if channels_last else x).requires_grad_()
    out, expected = pointwise(x), reference(x)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(expected)
    grads = torch.autograd.grad(out, (x, pointwise.weight, pointwise.bias), upstream)
    reference_grads = torch.autograd.grad(expected, (x, reference.weight, reference.bias), upstream)
    for grad, reference_grad in zip(grads, reference_grads, strict=True):
        assert grad.shape == reference_grad.shape
        assert torch.allclose(grad, reference_grad, rtol=1e-4, atol=1e-4)


def test_pointwise_conv_is_a_convolution_in_traced_graphs() -> None:
    pointwise = PointwiseConv2d(8, 4).eval()
    x = torch.randn(1, 8, 5, 5)
    traced = torch.jit.trace(pointwise, x)
    graph = str(traced.inlined_graph)
    assert "aten::_convolution" in graph
    assert "aten::linear" not in graph
    assert torch.allclose(traced(x), pointwise(x), atol=1e-5)


def test_invalid_configuration_is_rejected_with_the_setting_named() -> None:
    cases = {
        "kernel_size": {"kernel_size": 4},
        "expansion": {"expansion": 0},
        "attention": {"attention": "cbam"},
        "depths": {"depths": (2, 5)},
        "subnet": {"subnet": "resnet"},
        "subnet must be one of .* one per scale": {"subnet": ("msflow", "hierarchical")},
        "pos_embed_dim": {"pos_embed_dim": 10},
    }
    for setting, kwargs in cases.items():
        with pytest.raises(ValueError, match=setting):
            MultiScaleFlow((8, 8, 8), FlowConfig(**kwargs))


def test_flow_config_is_frozen_keeps_depths_as_ints_and_names_every_bad_option() -> None:
    config = FlowConfig(depths=[1, 2, 3])
    assert config.depths == (1, 2, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.clamp = 1.0
    with pytest.raises(ValueError, match=r"kernel_size must be odd.*; activation must be one of \['gelu', 'relu'\]"):
        FlowConfig(kernel_size=4, activation="tanh")


def test_wrong_input_shapes_are_rejected() -> None:
    flow = MultiScaleFlow((4, 4, 4), FlowConfig(depths=(1, 1, 1), pos_embed_dim=4))
    with pytest.raises(ValueError, match="expects 3 tensors"):
        flow([torch.randn(1, 4, 4, 4), torch.randn(1, 5, 2, 2), torch.randn(1, 4, 1, 1)])
    with pytest.raises(ValueError, match="expects 3 tensors"):
        flow([torch.randn(1, 4, 4, 4)])


def test_flow_runs_on_any_resolution_and_keeps_shapes() -> None:
    flow = MultiScaleFlow((8, 16, 32), FlowConfig(depths=(1, 2, 1), pos_embed_dim=8)).eval()
    inputs = [torch.randn(2, 8, 12, 10), torch.randn(2, 16, 6, 5), torch.randn(2, 32, 3, 3)]
    latents, log_det = flow(inputs)
    assert [z.shape for z in latents] == [x.shape for x in inputs]
    assert log_det.shape == (2,) and torch.isfinite(log_det).all()
    assert not math.isnan(log_det.sum().item())
