"""LayerNorm over the channel axis at every pixel (MSFlow's and ConvNeXt's channels-first LayerNorm)."""

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


class ChannelLayerNorm(nn.LayerNorm):
    """Normalise each pixel's channel vector of an NCHW tensor, with a learned per-channel affine.

    Normalising channels only, and never over H and W, keeps the subnet independent of image-global statistics
    and of the input resolution.

    Args:
        channels (int): Number of channels ``C`` of the ``(B, C, H, W)`` input.
        eps (float, optional): Added to the variance. Defaults to ``1e-5``.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` of shape ``(B, C, H, W)`` over ``C``.

        Args:
            x (torch.Tensor): Input batch.

        Returns:
            torch.Tensor: Normalised tensor of the same shape (channels-last in memory, which the following
            convolutions consume without a copy).
        """
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(
            0,
            3,
            1,
            2,
        )
