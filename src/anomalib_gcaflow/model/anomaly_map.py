"""Pixel maps and image scores from the flow's latents: MSFlow's per-image normalised ones, or absolute likelihoods.

MSFlow (Zhou et al., IEEE TNNLS 2024; code https://github.com/cool-xuan/msflow, MIT) scores an image by the mean
of the K largest values of ``A_mul = 1 - exp(L - max L)``. That number crowds against 1 as soon as the least
likely pixels are a few tens of nats below the most likely one, which is every image of a briefly trained model:
in fp32 it rounds to exactly 1.0 (ties), and even in fp64 it saturates near 36 nats. The score here is
``-log(1 - s)`` of MSFlow's ``s``, computed in the log domain, where it never saturates and ranks images exactly as
MSFlow's formula does.

The GCAFlow paper (https://doi.org/10.3390/s25103205) keeps MSFlow's maps and score (``scoring="msflow"``). Both
divide each image's likelihoods by those of its own most likely pixel, so a pixel's value also depends on how
normal the best part of its image looks, which varies from image to image on textured or unevenly lit parts. The
flow is a density model of the training features: its log-likelihoods are comparable across images as they are.
``scoring="likelihood"`` uses them as they are, the anomaly map being each pixel's negative log-likelihood and the
image score the soft minimum of the log-likelihood over the K least likely pixels. Training is the same either way;
what each scoring measured on the same trained models is in ``benchmarks/results/convergence_scoring/``.

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

    * ``scoring="msflow"`` (the paper's): additive map ``P = sum_i Up(exp(l_i - max l_i))``, pixel anomaly map
      ``max P - P``; image score ``max L - log(mean_{p in P_K} exp(L_p))``, which equals ``-log(1 - s)`` for
      MSFlow's score ``s = mean_K(1 - exp(L - max L))``: strictly increasing in ``s``, so it ranks images
      identically, but free of ``s``'s saturation at 1.
    * ``scoring="likelihood"``: pixel anomaly map ``-L`` (negative log-likelihood); image score
      ``-log(mean_{p in P_K} exp(L_p))``, the same soft minimum without the image's own maximum.

    Args:
        top_k (float, optional): Fraction of pixels averaged into the image score. Defaults to 0.03.
        scoring (str, optional): ``"msflow"`` or ``"likelihood"``. Defaults to ``"msflow"``.

    Raises:
        ValueError: If ``top_k`` is not in ``(0, 1]`` or ``scoring`` is unknown.
    """

    def __init__(self, top_k: float = 0.03, scoring: str = "msflow") -> None:
        super().__init__()
        if not 0 < top_k <= 1:
            msg = f"top_k is a fraction of the pixels and must be in (0, 1], got {top_k}"
            raise ValueError(msg)
        if scoring not in SCORINGS:
            msg = f"scoring must be one of {list(SCORINGS)}, got {scoring!r}"
            raise ValueError(msg)
        self.top_k = top_k
        self.scoring = scoring

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
        per_image = self.scoring == "msflow"
        additive = 0.0
        log_product = 0.0
        for z in latents:
            # fp32 at least, also under autocast; fp64 stays fp64.
            log_likelihood = -0.5 * z.to(torch.promote_types(z.dtype, torch.float32)).square().mean(dim=1, keepdim=True)
            if per_image:
                likelihood = torch.exp(log_likelihood - log_likelihood.amax(dim=(2, 3), keepdim=True))
                additive = additive + _upsample(likelihood, size)
            log_product = log_product + _upsample(log_likelihood, size)
        anomaly_map = additive.amax(dim=(2, 3), keepdim=True) - additive if per_image else -log_product
        k = self.num_top_pixels(size)
        log_product = log_product.flatten(1)
        least_likely = -(-log_product).topk(k, dim=1).values
        score = -(torch.logsumexp(least_likely, dim=1) - math.log(k))
        if per_image:
            score = score + log_product.amax(dim=1)
        return anomaly_map, score


def _upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
