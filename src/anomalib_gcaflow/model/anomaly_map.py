"""Pixel maps and image scores from the flow's latents: MSFlow's per-image normalised ones, or absolute likelihoods.

MSFlow (Zhou et al., IEEE TNNLS 2024; code https://github.com/cool-xuan/msflow, MIT) scores an image by the mean
of the K largest values of ``A_mul = 1 - exp(L - max L)``. That number crowds against 1 as soon as the least
likely pixels are a few tens of nats below the most likely one, which is every image of a briefly trained model:
in fp32 it rounds to exactly 1.0 (ties), and even in fp64 it saturates near 36 nats. The score here is
``-log(1 - s)`` of MSFlow's ``s``, computed in the log domain, where it never saturates and ranks images exactly as
MSFlow's formula does.

The GCAFlow paper (https://doi.org/10.3390/s25103205) keeps MSFlow's map and score (``"msflow"``). Both divide
each image's likelihoods by those of its own most likely pixel, so a value also depends on how normal the best part
of its image looks, which varies from image to image on textured or unevenly lit parts. The flow is a density
model of the training features: its log-likelihoods are comparable across images as they are. ``"likelihood"``
uses them as they are: the map is each pixel's negative log-likelihood, the image score the soft minimum of the
log-likelihood over the K least likely pixels. The image score and the map choose independently; training is the
same either way. Measured (``benchmarks/results/convergence_scoring/``): the likelihood image score ties on bottle
and ranks Magnetic Tile's images better; the likelihood map is better on Magnetic Tile and worse on bottle.

Every value is per image (no normalisation over the batch or the data set), so an image gets the same map and
score whatever batch it is in.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

SCORINGS = ("msflow", "likelihood")


class AnomalyMapGenerator(nn.Module):
    """Turn per-scale latents into a pixel anomaly map and an image anomaly score.

    With the per-scale log-likelihood map ``l_i = -0.5 * mean_c z_i^2`` (bilinear upsampling ``Up`` to the input
    size, ``align_corners=True``), ``L = sum_i Up(l_i)`` (a product of likelihoods, interpolated in the log
    domain) and the ``K = floor(top_k * H * W)`` least likely pixels ``P_K``:

    * image score, ``image_score="msflow"`` (the paper's): ``max L - log(mean_{p in P_K} exp(L_p))``, which equals
      ``-log(1 - s)`` for MSFlow's score ``s = mean_K(1 - exp(L - max L))``: strictly increasing in ``s``, so it
      ranks images identically, but free of ``s``'s saturation at 1. ``"likelihood"``:
      ``-log(mean_{p in P_K} exp(L_p))``, the same soft minimum without the image's own maximum.
    * pixel map, ``pixel_map="msflow"`` (the paper's): ``max P - P`` with the additive map
      ``P = sum_i Up(exp(l_i - max l_i))``. ``"likelihood"``: ``-L``, each pixel's negative log-likelihood.

    Args:
        top_k (float, optional): Fraction of pixels averaged into the image score. Defaults to 0.03.
        image_score (str, optional): ``"msflow"`` or ``"likelihood"``. Defaults to ``"msflow"``.
        pixel_map (str, optional): ``"msflow"`` or ``"likelihood"``. Defaults to ``"msflow"``.

    Raises:
        ValueError: If ``top_k`` is not in ``(0, 1]`` or ``image_score`` or ``pixel_map`` is unknown.
    """

    def __init__(self, top_k: float = 0.03, image_score: str = "msflow", pixel_map: str = "msflow") -> None:
        super().__init__()
        if not 0 < top_k <= 1:
            msg = f"top_k is a fraction of the pixels and must be in (0, 1], got {top_k}"
            raise ValueError(msg)
        for name, value in (("image_score", image_score), ("pixel_map", pixel_map)):
            if value not in SCORINGS:
                msg = f"{name} must be one of {list(SCORINGS)}, got {value!r}"
                raise ValueError(msg)
        self.top_k = top_k
        self.image_score = image_score
        self.pixel_map = pixel_map

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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the map and the score.

        Args:
            latents (Sequence[torch.Tensor]): One ``(B, C_i, h_i, w_i)`` latent per scale.
            image_size (Sequence[int]): ``(H, W)`` of the input image.

        Returns:
            tuple[torch.Tensor, torch.Tensor]: Pixel anomaly map ``(B, 1, H, W)`` (>= 0) and image score ``(B,)``
            (>= 0, in nats), both fp32.
        """
        size = (int(image_size[0]), int(image_size[1]))
        additive_map = self.pixel_map == "msflow"
        additive = 0.0
        log_product = 0.0
        for z in latents:
            # fp32 at least, also under autocast; fp64 stays fp64.
            log_likelihood = -0.5 * z.to(torch.promote_types(z.dtype, torch.float32)).square().mean(dim=1, keepdim=True)
            if additive_map:
                likelihood = torch.exp(log_likelihood - log_likelihood.amax(dim=(2, 3), keepdim=True))
                additive = additive + _upsample(likelihood, size)
            log_product = log_product + _upsample(log_likelihood, size)
        anomaly_map = additive.amax(dim=(2, 3), keepdim=True) - additive if additive_map else -log_product
        k = self.num_top_pixels(size)
        log_product = log_product.flatten(1)
        least_likely = -(-log_product).topk(k, dim=1).values
        score = -(torch.logsumexp(least_likely, dim=1) - math.log(k))
        if self.image_score == "msflow":
            score = score + log_product.amax(dim=1)
        return anomaly_map, score


def _upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
