"""anomalib's post-processor with a normalisation that keeps every score's rank.

anomalib's ``PostProcessor`` maps a score ``x`` to ``clamp((x - threshold) / (max - min) + 0.5, 0, 1)`` with the
minimum, maximum and F1-optimal threshold of the validation predictions. Every score further than half the range
from the threshold becomes exactly 0 or 1, and the threshold rarely sits in the middle of the range, so the clamp
ties many test images (and pixels) whenever the test set reaches beyond what validation saw, or the threshold is
off-centre. anomalib's evaluator computes AUROC and PRO on these normalised values, so the ties lower the metrics it
reports; two different models then log the same AUROC to many digits.

:class:`RankPreservingPostProcessor` replaces the clamp by a strictly increasing map onto ``(0, 1)``,
``0.5 + u / (1 + 2 |u|)`` with ``u = (x - threshold) / (max - min)``: the same value (0.5) and slope (1) at the
threshold as anomalib's, so labels, masks and the sensitivity settings mean what they meant, and in fp32 two scores
stay apart until ``|u|`` reaches about 10^7 ranges. Everything else (metrics, thresholds, checkpointed buffers,
export) is anomalib's.
"""

import torch
from anomalib.post_processing import PostProcessor


class RankPreservingPostProcessor(PostProcessor):
    """``PostProcessor`` whose score and map normalisation is strictly increasing and never clamps.

    Args:
        **kwargs: ``PostProcessor``'s arguments (``enable_normalization``, ``enable_thresholding``,
            ``enable_threshold_matching``, ``image_sensitivity``, ``pixel_sensitivity``).
    """

    @staticmethod
    def _normalize(
        preds: torch.Tensor | None,
        norm_min: torch.Tensor,
        norm_max: torch.Tensor,
        threshold: torch.Tensor,
    ) -> torch.Tensor | None:
        """Map predictions onto ``(0, 1)`` with the threshold at 0.5, keeping their order.

        Args:
            preds (torch.Tensor | None): Scores or anomaly maps.
            norm_min (torch.Tensor): Smallest validation prediction (NaN before validation).
            norm_max (torch.Tensor): Largest validation prediction (NaN before validation).
            threshold (torch.Tensor): Raw threshold (NaN: the middle of the range).

        Returns:
            torch.Tensor | None: Normalised predictions; ``preds`` unchanged before validation has run.
        """
        # Before validation (no range yet) and for a constant validation output, anomalib's own values stand.
        stock = PostProcessor._normalize(preds, norm_min, norm_max, threshold)  # noqa: SLF001 - the overridden parent
        if preds is None:
            return None
        centre = torch.where(torch.isnan(threshold), (norm_max + norm_min) / 2, threshold)
        value_range = norm_max - norm_min
        distance = (preds - centre) / value_range
        return torch.where(value_range > 0, 0.5 + distance / (1 + 2 * distance.abs()), stock)
