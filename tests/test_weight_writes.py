"""Every way of writing weights: the folded positional response is never stale, and torch's utilities apply.

Each write path first fills the no-grad reuse of the positional response, then writes new weights its own way;
the folded forward must then equal the unfolded one in fp64.
"""

from collections.abc import Callable

import pytest
import torch
from anomalib.models.components.flow import AllInOneBlock
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from anomalib_gcaflow.model.flow import FlowConfig, HFlowBlock, HierarchicalSubnet, MultiScaleFlow, PositionalConv2d

TOLERANCE = 1e-10


def _conv() -> PositionalConv2d:
    torch.manual_seed(0)
    return PositionalConv2d(6, 10, 3, pos_channels=64).double()


def _input() -> torch.Tensor:
    return torch.randn(3, 6, 7, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _new_values(module: nn.Module, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in module.parameters()]


def _data_add(conv: PositionalConv2d) -> PositionalConv2d:
    for parameter, value in zip(conv.parameters(), _new_values(conv, 2), strict=True):
        parameter.data.add_(value)
    return conv


def _vector_to_parameters(conv: PositionalConv2d) -> PositionalConv2d:
    vector = parameters_to_vector(conv.parameters())
    vector_to_parameters(vector + torch.randn_like(vector), conv.parameters())
    return conv


def _numpy_view(conv: PositionalConv2d) -> PositionalConv2d:
    # Writes through a NumPy view share the storage and bypass torch entirely.
    for parameter in conv.parameters():
        parameter.detach().numpy()[...] *= -0.5
    return conv


def _ddp_broadcast(conv: PositionalConv2d) -> PositionalConv2d:
    # What DDP's start-up broadcast from rank 0 does to the other ranks' modules: an in-place copy into .data.
    source = PositionalConv2d(6, 10, 3, pos_channels=64).double()
    for parameter, value in zip(conv.parameters(), source.parameters(), strict=True):
        parameter.data.copy_(value.data)
    return conv


def _load_state_dict(conv: PositionalConv2d) -> PositionalConv2d:
    conv.load_state_dict(PositionalConv2d(6, 10, 3, pos_channels=64).double().state_dict())
    return conv


def _dtype_round_trip(conv: PositionalConv2d) -> PositionalConv2d:
    # Same input dtype before and after, different weight values (rounded to fp32 on the way).
    with torch.no_grad():
        for parameter in conv.parameters():
            parameter.add_(1e-9)
    return conv.float().double()


def _averaged(multi_avg_fn: Callable | None) -> Callable[[PositionalConv2d], nn.Module]:
    def write(conv: PositionalConv2d) -> nn.Module:
        averaged = AveragedModel(conv, multi_avg_fn=multi_avg_fn)
        with torch.no_grad():
            averaged(_input())  # fills the averaged copy's own reuse
        _data_add(conv)
        averaged.update_parameters(conv)
        averaged.update_parameters(conv)
        return averaged.module

    return write


WRITES = {
    "data_add": _data_add,
    "vector_to_parameters": _vector_to_parameters,
    "numpy_view": _numpy_view,
    "ddp_broadcast": _ddp_broadcast,
    "load_state_dict": _load_state_dict,
    "to_dtype": _dtype_round_trip,
    "swa": _averaged(None),
    "ema": _averaged(get_ema_multi_avg_fn(0.9)),
}


def _folded_and_unfolded(conv: PositionalConv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        folded = conv(x)
        conv.fold_positional = False
        unfolded = conv(x)
        conv.fold_positional = True
    return folded, unfolded


@pytest.mark.parametrize("write", WRITES.values(), ids=WRITES.keys())
def test_reused_positional_response_follows_every_weight_write(write: Callable[[PositionalConv2d], nn.Module]) -> None:
    conv, x = _conv(), _input()
    before, _ = _folded_and_unfolded(conv, x)
    assert conv._cached_response is not None  # the no-grad forward stored a response to reuse
    written = write(conv)
    folded, unfolded = _folded_and_unfolded(written, x)
    assert (folded - unfolded).abs().max() < TOLERANCE
    assert (folded - before).abs().max() > 1e-8  # the write changed the output, so staleness would show


def test_device_move_recomputes_the_response() -> None:
    # Only the CPU is here: "meta" stands in for another device; a response is never served across devices.
    conv, x = _conv(), _input()
    _folded_and_unfolded(conv, x)
    with torch.no_grad():
        response = conv.to("meta")(x.to("meta"))
    assert response.device.type == "meta"
    assert conv._cached_response[1].device.type == "meta"


def test_parameters_are_contiguous_learned_tensors_for_torch_utilities() -> None:
    flow = MultiScaleFlow((8, 8, 16), FlowConfig(depths=(1, 1, 1), pos_embed_dim=8))
    vector = parameters_to_vector(flow.parameters())
    assert vector.numel() == sum(p.numel() for p in flow.parameters())
    assert all(p.requires_grad for p in flow.parameters())
    names = {name.rsplit(".", 1)[-1] for name, _ in flow.named_buffers()}
    assert {"w_perm", "w_perm_inv"} <= names


def test_checkpoint_with_permutations_as_parameters_loads() -> None:
    """A state dict from the block that held its permutations as frozen parameters loads under the same keys."""

    def subnet(in_channels: int, out_channels: int) -> nn.Module:
        return HierarchicalSubnet(in_channels, out_channels, pos_channels=8)

    torch.manual_seed(3)
    upstream = AllInOneBlock(
        [(6, 1, 1)],
        subnet_constructor=subnet,
        affine_clamping=1.9,
        global_affine_type="SOFTPLUS",
        permute_soft=False,
    )
    old_state = upstream.state_dict()
    assert isinstance(upstream.w_perm_inv, nn.Parameter)
    assert not upstream.w_perm_inv.is_contiguous()

    torch.manual_seed(4)  # a different permutation, so loading must replace it
    block = HFlowBlock(6, subnet)
    assert not torch.equal(block.w_perm, upstream.w_perm)
    block.load_state_dict(old_state)
    assert block.state_dict().keys() == old_state.keys()
    for key, value in old_state.items():
        assert torch.equal(block.state_dict()[key], value), key
    assert torch.equal(block.permutation, upstream.w_perm.flatten(1).argmax(dim=1))
    x = torch.randn(2, 6, 4, 4)
    (y,), _ = block([x])
    (back,), _ = block([y], rev=True)
    assert torch.allclose(back, x, atol=1e-5)
    # The permutation the block applies is the loaded one, as the upstream block applies it.
    assert torch.equal(block._permute(x)[0], upstream._permute(x)[0])
