"""MSFlow's post-processing: additive likelihood map for pixels, multiplicative map's top-K mean for images.

Follows MSFlow (Zhou et al., IEEE TNNLS 2024; code https://github.com/cool-xuan/msflow, MIT) and the GCAFlow paper
(https://doi.org/10.3390/s25103205), which keeps it.

Every normalisation is per image (its own maximum), never over the batch or the data set, so an image gets the
same map and score whatever batch it is in.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


class AnomalyMapGenerator(nn.Module):
    """Turn per-scale latents into a pixel anomaly map and an image anomaly score.

    With the per-scale log-likelihood map ``l_i = -0.5 * mean_c z_i^2`` (bilinear upsampling ``Up`` to the input
    size, ``align_corners=True``):

    * additive map: ``P = sum_i Up(exp(l_i - max l_i))``, pixel anomaly map ``max P - P`` (localisation);
    * multiplicative map: ``L = sum_i Up(l_i)`` (a product of likelihoods, interpolated in the log domain),
      ``A_mul = 1 - exp(L - max L)``; the image score is the mean of its ``K = floor(top_k * H * W)`` largest
      values (detection).

    Args:
        top_k (float, optional): Fraction of pixels averaged into the image score. Defaults to 0.03.

    Raises:
        ValueError: If ``top_k`` is not in ``(0, 1]``.
    """

    def __init__(self, top_k: float = 0.03) -> None:
        super().__init__()
        if not 0 < top_k <= 1:
            msg = f"top_k is a fraction of the pixels and must be in (0, 1], got {top_k}"
            raise ValueError(msg)
        self.top_k = top_k

    def num_top_pixels(self, image_size: Sequence[int]) -> int:
        """Return K, the number of pixels averaged into the image score (7864 at 512 x 512).

        Args:
            image_size (Sequence[int]): ``(H, W)`` of the input image.

        Returns:
            int: ``max(1, floor(top_k * H * W))``.
        """
        return max(1, int(self.top_k * image_size[0] * image_size[1]))

    def forward(
        self,
        latents: Sequence[torch.Tensor],
        image_size: Sequence[int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compute the maps and the score.

        Args:
            latents (Sequence[torch.Tensor]): One ``(B, C_i, h_i, w_i)`` latent per scale.
            image_size (Sequence[int]): ``(H, W)`` of the input image.

        Returns:
            tuple[torch.Tensor, torch.Tensor, torch.Tensor]: Pixel anomaly map ``(B, 1, H, W)`` (>= 0), image score
            ``(B,)`` and multiplicative anomaly map ``(B, 1, H, W)`` (in ``[0, 1]``), all fp32.
        """
        size = (int(image_size[0]), int(image_size[1]))
        additive = 0.0
        log_product = 0.0
        for z in latents:
            log_likelihood = -0.5 * z.float().square().mean(dim=1, keepdim=True)
            likelihood = torch.exp(log_likelihood - log_likelihood.amax(dim=(2, 3), keepdim=True))
            additive = additive + _upsample(likelihood, size)
            log_product = log_product + _upsample(log_likelihood, size)
        anomaly_map = additive.amax(dim=(2, 3), keepdim=True) - additive
        # In fp32, 1 - exp(-d) rounds to exactly 1 for d > ~17 nats, so a weakly trained model would give many
        # images the same score of 1.0; fp64 keeps them apart up to ~36 nats.
        log_product = log_product.double()
        multiplicative_map = -torch.expm1(log_product - log_product.amax(dim=(2, 3), keepdim=True))
        top = multiplicative_map.flatten(1).topk(self.num_top_pixels(size), dim=1).values
        return anomaly_map, top.mean(dim=1).float(), multiplicative_map.float()


def _upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
