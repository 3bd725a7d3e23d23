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

Summing the scales' log-likelihoods weighs each scale by how widely its values spread, and they spread differently:
measured on Magnetic Tile (Lite0, 256²), the finest scale's per-pixel log-likelihood varies about twice as much over
the training images as the coarsest one's, while the coarsest one alone ranks the test images best (about 8 points
of image AUROC above the finest; ``benchmarks/results/convergence_diagnosis/``). ``"standardized"`` puts every scale
in the units of its own spread over normal data: each scale's log-likelihood minus its mean, over its standard
deviation. Both are tracked over the training batches like a BatchNorm's running statistics (momentum 0.1), from the
latents of every training step whatever the scoring, so any checkpoint trained with them can be re-scored this way.
Measured on the same runs (``benchmarks/results/convergence_scorings/``): the standardised image score ranks images
best for both subnets on both shared sets; the standardised map localises best on Magnetic Tile (textured) and the
paper's map on bottle (an object).

The standardised map lets a scale's extreme values dominate: a pixel a dozen standard deviations below normal at
one scale outweighs the two others, and the upsampling spreads it over its normal neighbours. The paper's map bounds
each scale's term (``exp(l_i - max l_i)`` lies in (0, 1]), and that bound, not its per-image normalisation, is what
makes it the better map on bottle (on dumped latents of 12 runs, dropping the image's maximum from it changed
nothing). ``"bounded"`` passes each scale's standardised value ``s`` through ``u / (1 + |u|)``,
``u = s / BOUNDED_HALF_SATURATION``, before the scales are summed: half way to its bound at two standard deviations
and strictly increasing; it nears its bound as ``1/|u|``, not exponentially like a logistic or Gaussian bound, so in
fp32 pixels hundreds of standard deviations out still keep their order. Measured
(``benchmarks/results/convergence_bounded/``): on bottle it localises better than the paper's map, on Magnetic Tile
as well as the standardised one, for both subnets.

The statistics describe the features the flow trains on, feature noise included, so clean normal test pixels sit
above the tracked mean (two to five tracked standard deviations per scale with the CPU recipe's noise 0.3), where
the bounded term already flattens and the small variations of normal pixels barely move the map. They are kept so:
replacing them after training by the exact statistics of the clean training features under the final weights (an ad
hoc try on an AMX Xeon, CPU recipe in bf16, seed 0) left bottle's pixel AUROC where it was (98.66 against 98.65) and
cost Magnetic Tile's bounded map 2.0 points (87.26 against 85.22).

Every value is per image (no normalisation over the batch; the tracked statistics are fixed at evaluation), so an
image gets the same map and score whatever batch it is in.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib_gcaflow.model.flow.tracing import is_tracing

SCORINGS = ("msflow", "likelihood", "standardized", "bounded")
BOUNDED_HALF_SATURATION = 2.0
STATISTICS_MOMENTUM = 0.1
STATISTICS_EPS = 1e-6


def _bounded(standardized: torch.Tensor) -> torch.Tensor:
    halved = standardized / BOUNDED_HALF_SATURATION
    return halved / (1 + halved.abs())


# The scorings that read the per-scale statistics tracked while training: what each makes of a scale's standardised
# log-likelihood before the scales are summed.
TRACKED_SCORINGS = {"standardized": lambda standardized: standardized, "bounded": _bounded}


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
    * ``"standardized"`` (either): as ``"likelihood"``, with ``L`` replaced by
      ``sum_i Up(s_i)``, ``s_i = (l_i - mean_i) / std_i`` with the statistics of ``l_i`` over the training pixels
      (:meth:`track`).
    * ``"bounded"`` (either): as ``"standardized"``, with ``s_i`` replaced by ``u_i / (1 + |u_i|)``,
      ``u_i = s_i / BOUNDED_HALF_SATURATION``.

    Args:
        top_k (float, optional): Fraction of pixels averaged into the image score. Defaults to 0.03.
        image_score (str, optional): ``"msflow"``, ``"likelihood"``, ``"standardized"`` or ``"bounded"``.
            Defaults to ``"msflow"``.
        pixel_map (str, optional): ``"msflow"``, ``"likelihood"``, ``"standardized"`` or ``"bounded"``.
            Defaults to ``"msflow"``.
        num_scales (int, optional): Feature scales whose statistics are tracked. Defaults to 3.

    Raises:
        ValueError: If ``top_k`` is not in ``(0, 1]``, ``image_score`` or ``pixel_map`` is unknown, or
            ``num_scales < 1``.
    """

    def __init__(
        self, top_k: float = 0.03, image_score: str = "msflow", pixel_map: str = "msflow", num_scales: int = 3
    ) -> None:
        super().__init__()
        if not 0 < top_k <= 1:
            msg = f"top_k is a fraction of the pixels and must be in (0, 1], got {top_k}"
            raise ValueError(msg)
        for name, value in (("image_score", image_score), ("pixel_map", pixel_map)):
            if value not in SCORINGS:
                msg = f"{name} must be one of {list(SCORINGS)}, got {value!r}"
                raise ValueError(msg)
        if num_scales < 1:
            msg = f"num_scales must be >= 1, got {num_scales}"
            raise ValueError(msg)
        self.top_k = top_k
        self.image_score = image_score
        self.pixel_map = pixel_map
        self.register_buffer("running_mean", torch.zeros(num_scales))
        self.register_buffer("running_var", torch.ones(num_scales))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def track(self, latents: Sequence[torch.Tensor]) -> None:
        """Update the running mean and variance of each scale's per-pixel log-likelihood with a training batch.

        The first batch sets them; later ones move them by ``STATISTICS_MOMENTUM`` (BatchNorm's rule), so they
        follow the flow as it trains and settle as its learning rate decays.

        Args:
            latents (Sequence[torch.Tensor]): One ``(B, C_i, h_i, w_i)`` latent per scale.

        Raises:
            ValueError: If the number of latents differs from ``num_scales``.
        """
        if len(latents) != self.running_mean.numel():
            msg = f"expected {self.running_mean.numel()} latents (one per scale), got {len(latents)}"
            raise ValueError(msg)
        values = torch.stack([torch.stack(torch.var_mean(_log_likelihood(z))) for z in latents], dim=1)
        variance, mean = values.to(self.running_mean.dtype)
        # A tensor, not a Python branch on the counter: no device-to-host sync in every training step.
        momentum = torch.where(self.num_batches_tracked == 0, 1.0, STATISTICS_MOMENTUM).to(mean.dtype)
        self.running_mean.lerp_(mean, momentum)
        self.running_var.lerp_(variance, momentum)
        self.num_batches_tracked += 1

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
        scales: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the map and the score.

        Args:
            latents (Sequence[torch.Tensor]): One ``(B, C_i, h_i, w_i)`` latent per scale.
            image_size (Sequence[int]): ``(H, W)`` of the input image.
            scales (Sequence[int] | None, optional): The scale each latent belongs to, which picks its tracked
                statistics (e.g. ``[2]`` to score the coarsest scale alone). Defaults to ``None``: every scale,
                in order.

        Returns:
            tuple[torch.Tensor, torch.Tensor]: Pixel anomaly map ``(B, 1, H, W)`` and image score ``(B,)``, both
            fp32, >= 0 and in nats, except that a ``"standardized"`` or ``"bounded"`` one is in standard deviations
            (bounded ones: of their bounded form), of either sign.

        Raises:
            ValueError: If a ``"standardized"`` or ``"bounded"`` scoring is asked of a model whose statistics were
                never tracked.
        """
        size = (int(image_size[0]), int(image_size[1]))
        # The upsampled sums over scales that the chosen scorings read.
        sums: dict[str, torch.Tensor | float] = {}
        if self.pixel_map == "msflow":
            sums["additive"] = 0.0
        if self.image_score not in TRACKED_SCORINGS or self.pixel_map == "likelihood":
            sums["likelihood"] = 0.0
        tracked = list(dict.fromkeys(name for name in (self.image_score, self.pixel_map) if name in TRACKED_SCORINGS))
        # A tracing export cannot branch on a buffer's value; the check has run in eager mode by then.
        if tracked and not is_tracing() and int(self.num_batches_tracked) == 0:
            msg = (
                f"{tracked[0]!r} scoring needs each scale's log-likelihood statistics, tracked while training; "
                "this model has none (never trained, or trained before they were tracked). Train it, or score "
                "with 'likelihood'."
            )
            raise ValueError(msg)
        sums |= dict.fromkeys(tracked, 0.0)
        for index, z in zip(range(len(latents)) if scales is None else scales, latents, strict=True):
            log_likelihood = _log_likelihood(z)
            if "additive" in sums:
                likelihood = torch.exp(log_likelihood - log_likelihood.amax(dim=(2, 3), keepdim=True))
                sums["additive"] = sums["additive"] + _upsample(likelihood, size)
            if "likelihood" in sums:
                sums["likelihood"] = sums["likelihood"] + _upsample(log_likelihood, size)
            if tracked:
                standardized = (log_likelihood - self.running_mean[index]) * torch.rsqrt(
                    self.running_var[index] + STATISTICS_EPS
                )
                for name in tracked:
                    sums[name] = sums[name] + _upsample(TRACKED_SCORINGS[name](standardized), size)
        if self.pixel_map == "msflow":
            anomaly_map = sums["additive"].amax(dim=(2, 3), keepdim=True) - sums["additive"]
        else:
            anomaly_map = -sums[self.pixel_map]
        k = self.num_top_pixels(size)
        log_product = sums[self.image_score if self.image_score in TRACKED_SCORINGS else "likelihood"].flatten(1)
        least_likely = -(-log_product).topk(k, dim=1).values
        score = -(torch.logsumexp(least_likely, dim=1) - math.log(k))
        if self.image_score == "msflow":
            score = score + log_product.amax(dim=1)
        return anomaly_map, score

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        # Checkpoints written before the statistics were tracked lack them: they load as never tracked, and only
        # the scorings that need them refuse to run.
        missing = [
            name for name in ("running_mean", "running_var", "num_batches_tracked") if prefix + name not in state_dict
        ]
        for name in missing:
            state_dict[prefix + name] = getattr(self, name).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _log_likelihood(z: torch.Tensor) -> torch.Tensor:
    """Per-pixel log-likelihood ``-0.5 * mean_c z^2`` of one scale, ``(B, 1, h, w)``.

    Args:
        z (torch.Tensor): The scale's latent ``(B, C, h, w)``.

    Returns:
        torch.Tensor: In fp32 at least, also under autocast; fp64 stays fp64.
    """
    return -0.5 * z.to(torch.promote_types(z.dtype, torch.float32)).square().mean(dim=1, keepdim=True)


def _upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
