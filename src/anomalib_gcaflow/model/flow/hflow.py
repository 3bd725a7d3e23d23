"""H-Flow block: anomalib's ``AllInOneBlock`` (affine coupling, SOFTPLUS global affine, hard permutation).

The block's math is the vendored FrEIA 0.2 block that MSFlow ran (log-scale ``clamp * tanh(0.1 * a)``). Two of
its steps are recomputed here in a cheaper but identical way:

* the fixed channel permutation, stored by the block as a dense C x C matrix and applied as a 1x1 convolution
  (C^2 multiply-adds per pixel), is applied as an index gather, which gives the same numbers (and so is its
  gradient, see :func:`permute_channels`);
* the log-determinant is summed in fp32 even under autocast.

The block's two permutation matrices (``w_perm``, ``w_perm_inv``) are fixed state, not learned, so they are kept
as buffers under the same state-dict keys: checkpoints written when they were frozen parameters load unchanged,
and every parameter is a contiguous learned tensor that torch's utilities (``parameters_to_vector``, optimisers,
weight averaging) accept.

The positional-encoding condition is added inside the subnet (see ``PositionalConv2d``), so the block itself is
built without a FrEIA condition and no encoding is ever repeated over the batch.
"""

from collections.abc import Callable

import torch
from anomalib.models.components.flow import AllInOneBlock
from torch import nn

from anomalib_gcaflow.model.flow.lean_backward import permute_channels
from anomalib_gcaflow.model.flow.reduction import sum_per_sample


class HFlowBlock(AllInOneBlock):
    """Affine coupling block with a fixed channel permutation and a learned global affine.

    Args:
        channels (int): Channels C of the input; the passive half has ``C - C // 2`` channels.
        subnet_constructor (Callable[[int, int], nn.Module]): Called as ``f(C - C // 2, 2 * (C // 2))`` to build
            the subnet that maps the passive half to the active half's log-scales and shifts.
        clamp (float, optional): Bound of the log-scales, ``clamp * tanh(0.1 * a)``. Defaults to 1.9.
    """

    def __init__(self, channels: int, subnet_constructor: Callable[[int, int], nn.Module], clamp: float = 1.9) -> None:
        # (C, 1, 1) declares a 2-D input; the block never checks H and W, so any feature-map size passes.
        super().__init__(
            [(channels, 1, 1)],
            subnet_constructor=subnet_constructor,
            affine_clamping=clamp,
            global_affine_type="SOFTPLUS",
            permute_soft=False,
        )
        for name in ("w_perm", "w_perm_inv"):
            matrix = getattr(self, name).detach().contiguous()
            delattr(self, name)
            self.register_buffer(name, matrix)
        self.register_buffer("permutation", torch.empty(channels, dtype=torch.long), persistent=False)
        self.register_buffer("inverse", torch.empty(channels, dtype=torch.long), persistent=False)
        self._index_permutation()
        self.register_load_state_dict_post_hook(_reindex_after_load)

    @torch.no_grad()
    def _index_permutation(self) -> None:
        """Derive gather indices from the stored one-hot permutation matrices (row i selects input perm[i])."""
        self.permutation.copy_(self.w_perm.flatten(1).argmax(dim=1))
        self.inverse.copy_(self.w_perm_inv.flatten(1).argmax(dim=1))

    def _permute(self, x: torch.Tensor, rev: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.global_scale_activation(self.global_scale)
        log_scale = torch.log(scale).sum(dtype=torch.promote_types(scale.dtype, torch.float32))
        if rev:
            return (permute_channels(x, self.inverse, self.permutation) - self.global_offset) / scale, log_scale
        return permute_channels(x * scale + self.global_offset, self.permutation, self.inverse), log_scale

    def _affine(self, x: torch.Tensor, a: torch.Tensor, rev: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        a = 0.1 * a
        channels = x.shape[1]
        log_scale = self.clamp * torch.tanh(a[:, :channels])
        shift = a[:, channels:]
        if rev:
            return (x - shift) * torch.exp(-log_scale), -sum_per_sample(log_scale)
        return x * torch.exp(log_scale) + shift, sum_per_sample(log_scale)


def _reindex_after_load(module: HFlowBlock, incompatible_keys: object) -> None:
    """Keep the gather indices in step with permutation matrices restored from a checkpoint.

    A module-level function rather than a lambda, so that the model stays picklable for export.
    """
    del incompatible_keys
    module._index_permutation()  # noqa: SLF001
