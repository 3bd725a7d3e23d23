"""Activation normalisation with data-dependent initialisation (Glow's ActNorm), at the entry of each scale.

Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", NeurIPS 2018.

Backbone features are far from the standard normal the flow maps to: EfficientNet-Lite0's pooled stages have
channel standard deviations of 5-7, WRN50's differ per stage. Without a normalisation, the first epochs of training
go into learning that scale through couplings and global affines whose learning rate was chosen for fine
adjustments, and meanwhile the likelihoods, and so the anomaly scores, mean little. ActNorm sets a per-channel
affine from the statistics of the first training batch, so the flow starts from standardised features and its
first likelihoods already rank pixels like a per-channel Gaussian model would. The affine stays trainable and
exactly invertible, with a log-determinant that does not depend on the input.
"""

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from anomalib_gcaflow.model.flow.invertible import ShapePreservingModule


class ActNorm(ShapePreservingModule):
    """Per-channel affine ``y = (x - shift) * exp(-log_std)``, initialised from the first training batch.

    Until it has seen a training batch (or loaded a state dict that has), the module is the identity. The
    initialisation averages the statistics over all processes of a distributed run, so every replica starts alike.

    Args:
        channels (int): Channels ``C`` of the ``(B, C, H, W)`` input.
        eps (float, optional): Floor of the standard deviation. Defaults to ``1e-6``.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__([(channels,)])
        self.eps = eps
        self.shift = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_std = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set the affine so that ``x`` comes out with zero mean and unit variance per channel.

        Args:
            x (torch.Tensor): A training batch ``(B, C, H, W)``.
        """
        values = x.detach().to(torch.promote_types(x.dtype, torch.float32)).transpose(0, 1).flatten(1)
        moments = torch.stack([values.sum(dim=1), values.square().sum(dim=1)])
        count = torch.tensor(float(values.shape[1]), device=x.device, dtype=moments.dtype)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(moments)
            dist.all_reduce(count)
        mean = moments[0] / count
        variance = (moments[1] / count - mean.square()).clamp_min(0)
        self.shift.copy_(mean.view_as(self.shift))
        self.log_std.copy_(variance.sqrt().clamp_min(self.eps).log().view_as(self.log_std))
        self.initialized.fill_(True)

    def forward(
        self,
        x: Sequence[torch.Tensor],
        c: Sequence[torch.Tensor] | None = None,
        rev: bool = False,
        jac: bool = True,
    ) -> tuple[tuple[torch.Tensor], torch.Tensor]:
        """Standardise (or, with ``rev``, de-standardise) the channels.

        Args:
            x (Sequence[torch.Tensor]): One tensor ``(B, C, H, W)``.
            c (Sequence[torch.Tensor] | None, optional): Unused; ActNorm takes no condition.
            rev (bool, optional): Apply the inverse. Defaults to ``False``.
            jac (bool, optional): Unused; the log-determinant is always returned. Defaults to ``True``.

        Returns:
            tuple[tuple[torch.Tensor], torch.Tensor]: The output and the per-sample log-determinant ``(B,)``,
            ``-H * W * sum(log_std)`` forward.
        """
        del c, jac
        (x,) = x
        if self.training and not rev and not self.initialized:
            self.initialize(x)
        pixels = x.shape[2] * x.shape[3]
        log_det = (-pixels * self.log_std.sum(dtype=torch.promote_types(self.log_std.dtype, torch.float32))).expand(
            x.shape[0],
        )
        if rev:
            return (x * self.log_std.exp() + self.shift,), -log_det
        return ((x - self.shift) * torch.exp(-self.log_std),), log_det
