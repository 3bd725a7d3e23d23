"""MultiScaleFlow: asymmetric parallel H-Flow stacks, one per scale, followed by FusionAttnFlow."""

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from anomalib_gcaflow.flow.actnorm import ActNorm
from anomalib_gcaflow.flow.attention import ATTENTIONS
from anomalib_gcaflow.flow.fusion import FusionAttnFlow
from anomalib_gcaflow.flow.hflow import HFlowBlock
from anomalib_gcaflow.flow.invertible import ShapePreservingModule
from anomalib_gcaflow.flow.permutation import ChannelPermutation
from anomalib_gcaflow.flow.subnets import ACTIVATIONS, HierarchicalSubnet, MSFlowSubnet

SUBNETS = ("hierarchical", "msflow")


class MultiScaleFlow(ShapePreservingModule):
    """The whole GCAFlow normalizing flow, usable without any backbone.

    ``flow(features) -> (latents, log_det)`` and ``flow(latents, rev=True) -> (features, -log_det)``, with one
    tensor per scale and one log-determinant per sample.

    Args:
        channels (Sequence[int]): Channels of each scale's features (e.g. 256, 512, 1024 for WRN50 layers 1-3).
        depths (Sequence[int], optional): H-Flow blocks per scale. Defaults to ``(2, 5, 8)``.
        kernel_size (int, optional): Spatial kernel of the hierarchical subnet, odd. Defaults to 5.
        expansion (int, optional): Hidden-width factor alpha of the hierarchical subnet, >= 1. Defaults to 4.
        attention (str, optional): Channel attention in the fusion subnets: ``"gca"``, ``"eca"``, ``"se"`` or
            ``"none"``. Defaults to ``"gca"``.
        subnet (str, optional): ``"hierarchical"`` (H-Flow) or ``"msflow"`` (MSFlow's 3x3-LN-ReLU-3x3).
            Defaults to ``"hierarchical"``.
        pos_embed_dim (int, optional): Channels of the positional-encoding condition, a multiple of 4.
            Defaults to 64.
        clamp (float, optional): Log-scale bound of every coupling. Defaults to 1.9.
        activation (str, optional): Activation of the hierarchical subnet, ``"gelu"`` or ``"relu"``.
            Defaults to ``"gelu"``.
        fold_positional (bool, optional): Fold the positional encoding's convolution out of the per-image work
            (exact; see ``PositionalConv2d``). Defaults to ``True``.
        data_init (bool, optional): Start from the data, as Glow does: an :class:`ActNorm` at each scale's entry,
            set from the first training batch, and every coupling's output layer at zero, so the untrained flow is
            exactly that standardisation and the first epoch already yields useful likelihoods. ``False`` builds
            the paper's flow with MSFlow's initialisation (and its parameter count). Defaults to ``True``.

    Raises:
        ValueError: If any argument is out of its range (the message names it and the accepted values).
    """

    def __init__(
        self,
        channels: Sequence[int],
        depths: Sequence[int] = (2, 5, 8),
        kernel_size: int = 5,
        expansion: int = 4,
        attention: str = "gca",
        subnet: str = "hierarchical",
        pos_embed_dim: int = 64,
        clamp: float = 1.9,
        activation: str = "gelu",
        fold_positional: bool = True,
        data_init: bool = True,
    ) -> None:
        channels, depths = [int(c) for c in channels], [int(d) for d in depths]
        _validate(channels, depths, kernel_size, expansion, attention, subnet, pos_embed_dim, clamp, activation)
        super().__init__([(c,) for c in channels])
        self.channels = channels
        if subnet == "hierarchical":
            subnet_constructor = partial(
                HierarchicalSubnet,
                pos_channels=pos_embed_dim,
                kernel_size=kernel_size,
                expansion=expansion,
                activation=activation,
                fold_positional=fold_positional,
            )
        else:
            subnet_constructor = partial(MSFlowSubnet, pos_channels=pos_embed_dim, fold_positional=fold_positional)
        self.stacks = nn.ModuleList(
            nn.ModuleList(HFlowBlock(c, subnet_constructor, clamp) for _ in range(depth))
            for c, depth in zip(channels, depths, strict=True)
        )
        self.permutations = nn.ModuleList(ChannelPermutation(c) for c in channels)
        self.fusion = FusionAttnFlow(channels, attention=attention, clamp=clamp)
        self.input_norms = nn.ModuleList(ActNorm(c) for c in channels) if data_init else None
        if data_init:
            output_layers = [block.subnet[-1] for stack in self.stacks for block in stack]
            output_layers += [*self.fusion.subnet_p.heads, *self.fusion.subnet_q.heads]
            for layer in output_layers:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(
        self,
        x: Sequence[torch.Tensor],
        c: Sequence[torch.Tensor] | None = None,
        rev: bool = False,
        jac: bool = True,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Map features to latents or, with ``rev``, latents back to features.

        Args:
            x (Sequence[torch.Tensor]): One ``(B, C_i, H_i, W_i)`` tensor per scale.
            c (Sequence[torch.Tensor] | None, optional): Unused; the positional condition is built inside.
            rev (bool, optional): Run the inverse. Defaults to ``False``.
            jac (bool, optional): Unused; the log-determinant is always returned. Defaults to ``True``.

        Returns:
            tuple[list[torch.Tensor], torch.Tensor]: Outputs per scale and the per-sample log-determinant ``(B,)``.

        Raises:
            ValueError: If the inputs do not match the flow's scales and channels.
        """
        del c, jac
        self._check_inputs(x)
        log_dets = []
        if rev:
            x, fusion_log_det = self.fusion(x, rev=True)
            log_dets.append(fusion_log_det)
        outputs = []
        norms = self.input_norms if self.input_norms is not None else [None] * len(self.stacks)
        for xi, norm, stack, permutation in zip(x, norms, self.stacks, self.permutations, strict=True):
            if norm is not None and not rev:
                (xi,), norm_log_det = norm((xi,))
                log_dets.append(norm_log_det)
            if rev:
                (xi,), _ = permutation((xi,), rev=True)
            for block in reversed(stack) if rev else stack:
                (xi,), block_log_det = block((xi,), rev=rev)
                log_dets.append(block_log_det)
            if not rev:
                (xi,), _ = permutation((xi,))
            if norm is not None and rev:
                (xi,), norm_log_det = norm((xi,), rev=True)
                log_dets.append(norm_log_det)
            outputs.append(xi)
        if not rev:
            outputs, fusion_log_det = self.fusion(outputs)
            log_dets.append(fusion_log_det)
        return list(outputs), torch.stack(log_dets).sum(dim=0)

    def _check_inputs(self, x: Sequence[torch.Tensor]) -> None:
        """Fail early, with the expected layout, on inputs that do not match the flow."""
        shapes = [tuple(t.shape) for t in x]
        if len(x) != len(self.channels) or any(
            t.dim() != 4 or t.shape[1] != c for t, c in zip(x, self.channels, strict=False)
        ):
            msg = (
                f"MultiScaleFlow expects {len(self.channels)} tensors shaped (B, C, H, W) with C = {self.channels}, "
                f"got shapes {shapes}"
            )
            raise ValueError(msg)
        # Compared pairwise, not collected in a set: under torch.export the batch size is an unhashable SymInt.
        if any(t.shape[0] != x[0].shape[0] for t in x[1:]):
            msg = f"all scales must share the batch size, got shapes {shapes}"
            raise ValueError(msg)


def _validate(
    channels: list[int],
    depths: list[int],
    kernel_size: int,
    expansion: int,
    attention: str,
    subnet: str,
    pos_embed_dim: int,
    clamp: float,
    activation: str,
) -> None:
    """Reject configurations that would fail later with an obscure tensor error."""
    problems = []
    if not channels or any(c < 2 or c % 2 for c in channels):
        problems.append(f"channels must be even and >= 2 per scale, got {channels}")
    if len(depths) != len(channels) or any(d < 1 for d in depths):
        problems.append(f"depths must give one positive block count per scale ({len(channels)} scales), got {depths}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        problems.append(f"kernel_size must be odd and positive (3, 5 or 7 in the paper), got {kernel_size}")
    if int(expansion) != expansion or expansion < 1:
        problems.append(f"expansion must be an integer >= 1 (1-4 in the paper), got {expansion}")
    if attention not in ATTENTIONS:
        problems.append(f"attention must be one of {sorted(ATTENTIONS)}, got {attention!r}")
    if subnet not in SUBNETS:
        problems.append(f"subnet must be one of {list(SUBNETS)}, got {subnet!r}")
    if pos_embed_dim < 4 or pos_embed_dim % 4:
        problems.append(f"pos_embed_dim must be a positive multiple of 4, got {pos_embed_dim}")
    if not clamp > 0:
        problems.append(f"clamp must be positive, got {clamp}")
    if activation not in ACTIVATIONS:
        problems.append(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if problems:
        raise ValueError("invalid MultiScaleFlow configuration: " + "; ".join(problems))
