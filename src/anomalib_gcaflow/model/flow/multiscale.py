"""MultiScaleFlow: asymmetric parallel H-Flow stacks, one per scale, followed by FusionAttnFlow."""

from collections.abc import Sequence

import torch
from torch import nn

from anomalib_gcaflow.model.flow.actnorm import ActNorm
from anomalib_gcaflow.model.flow.config import FlowConfig
from anomalib_gcaflow.model.flow.fusion import FusionAttnFlow
from anomalib_gcaflow.model.flow.hflow import HFlowBlock
from anomalib_gcaflow.model.flow.invertible import ShapePreservingModule
from anomalib_gcaflow.model.flow.permutation import ChannelPermutation
from anomalib_gcaflow.model.flow.subnets import SUBNETS


class MultiScaleFlow(ShapePreservingModule):
    """The whole GCAFlow normalizing flow, usable without any backbone.

    ``flow(features) -> (latents, log_det)`` and ``flow(latents, rev=True) -> (features, -log_det)``, with one
    tensor per scale and one log-determinant per sample.

    Args:
        channels (Sequence[int]): Channels of each scale's features (e.g. 256, 512, 1024 for WRN50 layers 1-3), even.
        config (FlowConfig | None, optional): The flow's shape, with one depth per scale. Defaults to ``None``:
            ``FlowConfig()``, the paper's flow with the data-dependent start.

    Raises:
        ValueError: If ``channels`` are not even or ``config.depths`` does not give one depth per scale.
    """

    def __init__(self, channels: Sequence[int], config: FlowConfig | None = None) -> None:
        config = FlowConfig() if config is None else config
        channels = [int(c) for c in channels]
        _check_scales(channels, config.depths)
        super().__init__([(c,) for c in channels])
        self.channels = channels
        self.config = config
        self.stacks = nn.ModuleList(
            nn.ModuleList(HFlowBlock(c, SUBNETS[subnet].constructor(config), config.clamp) for _ in range(depth))
            for c, depth, subnet in zip(channels, config.depths, config.subnet, strict=True)
        )
        self.permutations = nn.ModuleList(ChannelPermutation(c) for c in channels)
        self.fusion = FusionAttnFlow(channels, attention=config.attention, clamp=config.clamp)
        self.input_norms = nn.ModuleList(ActNorm(c) for c in channels) if config.data_init else None
        if config.data_init:
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
            steps = [*stack] if norm is None else [norm, *stack]
            if rev:
                (xi,), _ = permutation((xi,), rev=True)
            for step in reversed(steps) if rev else steps:
                (xi,), step_log_det = step((xi,), rev=rev)
                log_dets.append(step_log_det)
            if not rev:
                (xi,), _ = permutation((xi,))
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


def _check_scales(channels: list[int], depths: Sequence[int]) -> None:
    """Reject scales that would fail later with an obscure tensor error (the options are checked by FlowConfig)."""
    problems = []
    if not channels or any(c < 2 or c % 2 for c in channels):
        problems.append(f"channels must be even and >= 2 per scale, got {channels}")
    if len(depths) != len(channels):
        problems.append(
            f"depths must give one positive block count per scale ({len(channels)} scales), got {list(depths)}"
        )
    if problems:
        raise ValueError("invalid MultiScaleFlow configuration: " + "; ".join(problems))
