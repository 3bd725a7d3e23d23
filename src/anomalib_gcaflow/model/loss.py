"""Negative log-likelihood of the flow's latents under a standard normal (MSFlow's loss).

Follows MSFlow (Zhou et al., IEEE TNNLS 2024; code https://github.com/cool-xuan/msflow, MIT).
"""

import math
from collections.abc import Sequence

import torch
from torch import nn

from anomalib_gcaflow.model.flow.reduction import sum_per_sample

HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)


class GCAFlowLoss(nn.Module):
    """``mean_batch( sum_i 0.5 * ||z_i||^2 - log_det )``, summed over every scale, channel and position.

    The loss is deliberately not normalised by the number of dimensions: gradient clipping at norm 2 and the
    learning rate were tuned on this scale (MSFlow). It is large (about -1e6 per 512^2 image once trained);
    :meth:`per_dimension` gives the readable number. Reductions run in fp32 even under autocast.
    """

    def forward(self, latents: Sequence[torch.Tensor], log_det: torch.Tensor) -> torch.Tensor:
        """Compute the batch loss.

        Args:
            latents (Sequence[torch.Tensor]): One ``(B, C_i, h_i, w_i)`` latent per scale.
            log_det (torch.Tensor): Per-sample log-determinant of the whole flow, ``(B,)``.

        Returns:
            torch.Tensor: Scalar loss.
        """
        return self.per_image(latents, log_det).mean()

    @staticmethod
    def per_image(latents: Sequence[torch.Tensor], log_det: torch.Tensor) -> torch.Tensor:
        """Compute the unnormalised loss of every image.

        Args:
            latents (Sequence[torch.Tensor]): One ``(B, C_i, h_i, w_i)`` latent per scale.
            log_det (torch.Tensor): Per-sample log-determinant, ``(B,)``.

        Returns:
            torch.Tensor: ``(B,)`` in fp32 (or fp64 for fp64 inputs).
        """
        squared_norm = torch.stack([sum_per_sample(z.square()) for z in latents]).sum(dim=0)
        return 0.5 * squared_norm - log_det.to(squared_norm.dtype)

    @staticmethod
    def per_dimension(loss: torch.Tensor, latents: Sequence[torch.Tensor]) -> torch.Tensor:
        """Convert a (batch-mean) loss into the exact negative log-likelihood in nats per latent dimension.

        Adds the Gaussian constant ``0.5 * log(2 pi)`` that the training loss leaves out, so the value is
        comparable across input sizes and backbones (lower is better; negative is normal for a trained flow).

        Args:
            loss (torch.Tensor): Loss from :meth:`forward` or :meth:`per_image`.
            latents (Sequence[torch.Tensor]): The latents it was computed from (only their sizes are used).

        Returns:
            torch.Tensor: Same shape as ``loss``.
        """
        dims = sum(z[0].numel() for z in latents)
        return loss / dims + HALF_LOG_TWO_PI
