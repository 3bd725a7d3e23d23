"""FusionAttnFlow: MSFlow's cross-scale double coupling with channel attention inside both of its subnets.

The attention acts on the fused multi-scale tensor *inside* the subnets that predict log-scales and shifts. On
the flow's data path it would make the Jacobian dense (its softmax pooling couples every position) and the
log-determinant intractable; inside a subnet it only changes the values of (s, t), so the flow keeps its exact
inverse and its closed-form log-determinant, the sum of the clamped log-scales.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib_gcaflow.model.flow.attention import build_channel_attention
from anomalib_gcaflow.model.flow.invertible import ShapePreservingModule
from anomalib_gcaflow.model.flow.lean_backward import clamp_latents
from anomalib_gcaflow.model.flow.norm import ChannelLayerNorm
from anomalib_gcaflow.model.flow.reduction import sum_per_sample

# MSFlow's soft clamp uses 0.636 (not exactly 2/pi); kept for fidelity.
ATAN_CLAMP_SCALE = 0.636
# MSFlow clips the fused latents; only values far outside any trained distribution are affected.
LATENT_LIMIT = 1e6


class FusionSubnet(nn.Module):
    """Predict (log-scale, shift) for every scale from all scales at once.

    All inputs are average-pooled to the smallest scale, concatenated, passed through a 3x3 bottleneck to a
    quarter of the width and back, reweighted by channel attention, split back per scale, bilinearly upsampled
    and added to the scale's own input, then a 3x3 head per scale gives its (s, t).

    Args:
        channels (Sequence[int]): Channels of each input (one per scale).
        attention (str): Channel attention on the fused tensor: ``"gca"``, ``"eca"``, ``"se"`` or ``"none"``.
    """

    def __init__(self, channels: Sequence[int], attention: str) -> None:
        super().__init__()
        self.channels = list(channels)
        fused = sum(self.channels)
        self.bottleneck = nn.Sequential(
            nn.Conv2d(fused, fused // 4, 3, padding=1),
            ChannelLayerNorm(fused // 4),
            nn.ReLU(),
            nn.Conv2d(fused // 4, fused, 3, padding=1),
            nn.ReLU(),
        )
        self.attention = build_channel_attention(attention, fused)
        # One conv per scale emits s and t stacked: the same parameters as two separate 3x3 heads.
        self.heads = nn.ModuleList(nn.Conv2d(c, 2 * c, 3, padding=1) for c in self.channels)

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Compute the coupling parameters.

        Args:
            inputs (Sequence[torch.Tensor]): One ``(B, C_i, H_i, W_i)`` tensor per scale.

        Returns:
            list[tuple[torch.Tensor, torch.Tensor]]: ``(s_i, t_i)`` per scale, each shaped like ``inputs[i]``.
        """
        smallest = min((x.shape[-2:] for x in inputs), key=lambda size: size[0] * size[1])
        fused = torch.cat([F.adaptive_avg_pool2d(x, smallest) for x in inputs], dim=1)
        fused = self.attention(self.bottleneck(fused))
        params = []
        for x, part, head in zip(inputs, fused.split(self.channels, dim=1), self.heads, strict=True):
            residual = x + F.interpolate(part, size=x.shape[-2:], mode="bilinear", align_corners=True)
            params.append(head(residual).chunk(2, dim=1))
        return params


class FusionAttnFlow(ShapePreservingModule):
    """One double affine coupling over all scales, with channel attention in its subnets.

    Each input z_i is split into halves (p_i, q_i). Forward: p'_i = p_i * exp(sigma(s_i(q))) + t_i(q), then
    q'_i = q_i * exp(sigma(s'_i(p'))) + t'_i(p'), where sigma(s) = clamp * 0.636 * atan(s / clamp) and the
    subnets see every scale's half. The log-determinant is the sum of all sigma(.) terms.

    Args:
        channels (Sequence[int]): Channels of each scale's input; each must be even.
        attention (str, optional): ``"gca"``, ``"eca"``, ``"se"`` or ``"none"`` (MSFlow's fusion).
            Defaults to ``"gca"``.
        clamp (float, optional): Bound of the soft-clamped log-scales. Defaults to 1.9.

    Raises:
        ValueError: If a channel count is odd or ``clamp`` is not positive.
    """

    def __init__(self, channels: Sequence[int], attention: str = "gca", clamp: float = 1.9) -> None:
        super().__init__([(c,) for c in channels])
        if any(c % 2 for c in channels):
            msg = f"FusionAttnFlow needs an even channel count at every scale, got {list(channels)}"
            raise ValueError(msg)
        if clamp <= 0:
            msg = f"clamp must be positive, got {clamp}"
            raise ValueError(msg)
        halves = [c // 2 for c in channels]
        self.clamp = clamp
        self.subnet_p = FusionSubnet(halves, attention)  # conditions the first halves on the second
        self.subnet_q = FusionSubnet(halves, attention)  # conditions the second halves on the updated first

    def _couple(
        self,
        targets: Sequence[torch.Tensor],
        params: Sequence[tuple[torch.Tensor, torch.Tensor]],
        rev: bool,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Apply (or undo) one affine half-step to every scale and return its log-determinant."""
        outputs, log_det = [], 0.0
        for x, (raw_scale, shift) in zip(targets, params, strict=True):
            log_scale = self.clamp * ATAN_CLAMP_SCALE * torch.atan(raw_scale / self.clamp)
            outputs.append((x - shift) * torch.exp(-log_scale) if rev else x * torch.exp(log_scale) + shift)
            log_det = log_det + sum_per_sample(log_scale)
        return outputs, -log_det if rev else log_det

    def forward(
        self,
        x: Sequence[torch.Tensor],
        c: Sequence[torch.Tensor] | None = None,
        rev: bool = False,
        jac: bool = True,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Run the coupling forward (features -> latents) or, with ``rev``, backward.

        Args:
            x (Sequence[torch.Tensor]): One ``(B, C_i, H_i, W_i)`` tensor per scale.
            c (Sequence[torch.Tensor] | None, optional): Unused; the fusion flow is unconditioned.
            rev (bool, optional): Invert the layer. Defaults to ``False``.
            jac (bool, optional): Unused; the log-determinant is always returned. Defaults to ``True``.

        Returns:
            tuple[tuple[torch.Tensor, ...], torch.Tensor]: The outputs per scale and the per-sample
            log-determinant ``(B,)`` (negated for ``rev``).
        """
        del c, jac
        first, second = zip(*(t.chunk(2, dim=1) for t in x), strict=True)
        if not rev:
            first, log_det_p = self._couple(first, self.subnet_p(second), rev=False)
            second, log_det_q = self._couple(second, self.subnet_q(first), rev=False)
            outputs = tuple(
                clamp_latents(torch.cat(halves, dim=1), LATENT_LIMIT) for halves in zip(first, second, strict=True)
            )
        else:
            second, log_det_q = self._couple(second, self.subnet_q(first), rev=True)
            first, log_det_p = self._couple(first, self.subnet_p(second), rev=True)
            outputs = tuple(torch.cat(halves, dim=1) for halves in zip(first, second, strict=True))
        return outputs, log_det_p + log_det_q
