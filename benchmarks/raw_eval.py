"""Metrics from a model's raw outputs, in float64, and a callback that measures them during training.

anomalib's pipeline normalises and clamps every score to [0, 1] (its PostProcessor) before its Evaluator runs,
and its AUPRO casts maps to float32: both create ties that change the rankings the metrics measure. The functions
here read ``pred_score`` and ``anomaly_map`` as the torch model returns them (after the model's own pre-processing
of the input) and rank them in float64:

- image and pixel AUROC: the Mann-Whitney statistic (a tie counts one half);
- image AUROC per defect type (each type's images against all normal ones) and, for GCAFlow, of the image score
  each feature scale gives alone: where a model ranks worse, these say which defects and which scale;
- for GCAFlow, the three metrics under every scoring its generator offers (``msflow``, ``likelihood``,
  ``standardized``), from the same latents: one training run compares the ways of scoring it;
- PRO: anomalib's AUPRO definition (connected regions of the ground truth found by anomalib's
  ``connected_components_cpu``, per-region overlap averaged over regions against the global false-positive rate,
  area up to ``fpr_limit`` with the curve interpolated there, divided by ``fpr_limit``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from anomalib.models.components import AnomalibModule
from anomalib.utils.cv import connected_components_cpu
from lightning.pytorch import Callback, Trainer
from scipy.stats import rankdata
from torch.utils.data import DataLoader

from anomalib_gcaflow.model.anomaly_map import SCORINGS, TRACKED_SCORINGS, AnomalyMapGenerator
from benchmarks.data import defect_type
from benchmarks.rates import autocast_context
from benchmarks.timing import TrainingClock, cpu_seconds

PRO_FPR_LIMIT = 0.3


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve, exactly, from float64 ranks.

    Args:
        scores: Scores, higher = more anomalous.
        labels: 1 for anomalous, 0 for normal, same length.

    Returns:
        float: The AUROC.

    Raises:
        ValueError: If either class is absent.
    """
    positives = np.asarray(labels).reshape(-1) == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if not n_pos or not n_neg:
        msg = f"AUROC needs both classes; got {n_pos} anomalous and {n_neg} normal samples."
        raise ValueError(msg)
    ranks = rankdata(np.asarray(scores, dtype=np.float64).reshape(-1))
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = PRO_FPR_LIMIT) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (anomalib's AUPRO), in float64.

    Args:
        maps: Anomaly maps, shape ``(N, H, W)``.
        masks: Ground-truth masks (non-zero = anomalous), shape ``(N, H, W)``.
        fpr_limit: Upper limit of the false-positive rate.

    Returns:
        float: The PRO.

    Raises:
        ValueError: Without anomalous regions or without normal pixels.
    """
    binary = torch.from_numpy((np.asarray(masks) > 0).astype(np.float32)).unsqueeze(1)
    regions = connected_components_cpu(binary).reshape(-1).long().numpy()
    scores = np.asarray(maps, dtype=np.float64).reshape(-1)
    background = regions == 0
    sizes = np.bincount(regions)
    n_background, n_regions = int(background.sum()), int((sizes[1:] > 0).sum())
    if not n_background or not n_regions:
        msg = f"PRO needs normal pixels and anomalous regions; got {n_background} and {n_regions}."
        raise ValueError(msg)
    fp_step = background / n_background
    overlap_step = np.where(background, 0.0, 1.0 / sizes[regions]) / n_regions
    order = np.argsort(-scores, kind="stable")
    ordered = scores[order]
    # One point per distinct threshold: the last pixel of each run of equal scores.
    last = np.append(ordered[:-1] != ordered[1:], True)
    fpr = np.concatenate([[0.0], np.cumsum(fp_step[order])[last]])
    overlap = np.concatenate([[0.0], np.cumsum(overlap_step[order])[last]])
    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:inside], overlap[:inside]
    if x[-1] < fpr_limit and inside < len(fpr):
        weight = (fpr_limit - fpr[inside - 1]) / (fpr[inside] - fpr[inside - 1])
        x = np.append(x, fpr_limit)
        y = np.append(y, overlap[inside - 1] + weight * (overlap[inside] - overlap[inside - 1]))
    return float(np.trapezoid(y, x) / x[-1])


def raw_outputs(
    module: AnomalibModule, dataloader: DataLoader, autocast_dtype: torch.dtype | None = None
) -> dict[str, np.ndarray]:
    """Run the torch model in eval mode over a test loader; restore every module's mode and every RNG afterwards.

    The input goes through the module's pre-processor transform as anomalib's test loop applies it (image and
    mask), then through ``module.model``; nothing of anomalib's post-processing runs. Modes and random states are
    restored so that a training run continues exactly as it would have without this evaluation (creating a data
    loader iterator draws from torch's generator).

    Args:
        module: The anomalib model.
        dataloader: Test data loader.
        autocast_dtype: Run the model under autocast to this dtype (as a mixed-precision trainer tests it);
            ``None``: full precision.

    Returns:
        dict[str, np.ndarray]: ``scores`` (N,), ``labels`` (N,), ``maps`` and ``masks`` (N, H, W), float64 scores,
        ``defect_types`` (N,) (``"good"`` for normal images, see :func:`benchmarks.data.defect_type`) and, for a
        GCAFlow model, ``scale_scores`` (N, S): the image score each feature scale gives alone, and ``scorings``:
        scoring name -> ``{"scores": (N,), "maps": (N, H, W)}`` as the generator gives them with that image score
        and pixel map.
    """
    modes = {submodule: submodule.training for submodule in module.modules()}
    states = _random_states()
    device = module.device
    scores, labels, maps, masks, types, scale_scores = [], [], [], [], [], []
    scorings: dict[str, dict[str, list[np.ndarray]]] = {}
    latents = _LatentRecorder(module.model)
    module.eval()
    try:
        with torch.no_grad(), autocast_context(device, autocast_dtype):
            for batch in dataloader:
                image, mask = batch.image, batch.gt_mask
                if module.pre_processor and module.pre_processor.transform:
                    image, mask = module.pre_processor.transform(image, mask)
                predictions = module.model(image.to(device))
                anomaly_map = predictions.anomaly_map.detach().cpu().double().reshape(len(image), *image.shape[-2:])
                scores.append(predictions.pred_score.detach().cpu().double().reshape(-1).numpy())
                maps.append(anomaly_map.numpy())
                masks.append(mask.cpu().reshape(anomaly_map.shape).numpy() > 0)
                batch_labels = batch.gt_label.cpu().reshape(-1).numpy().astype(np.int64)
                labels.append(batch_labels)
                types.append([
                    defect_type(path) if label else "good"
                    for path, label in zip(batch.image_path, batch_labels, strict=True)
                ])
                if latents.enabled:
                    scale_scores.append(latents.scale_scores(image.shape[-2:]))
                    for name, (scoring_map, scoring_score) in latents.scorings(image.shape[-2:]).items():
                        columns = scorings.setdefault(name, {"scores": [], "maps": []})
                        columns["scores"].append(scoring_score)
                        columns["maps"].append(scoring_map)
    finally:
        latents.remove()
        for submodule, training in modes.items():
            submodule.train(training)
        _restore_random_states(states)
    outputs = {
        "scores": np.concatenate(scores),
        "labels": np.concatenate(labels),
        "maps": np.concatenate(maps),
        "masks": np.concatenate(masks),
        "defect_types": np.concatenate(types),
    }
    if scale_scores:
        outputs["scale_scores"] = np.concatenate(scale_scores)
        outputs["scorings"] = {
            name: {key: np.concatenate(values) for key, values in columns.items()} for name, columns in scorings.items()
        }
    return outputs


class _LatentRecorder:
    """Keep the latents of a GCAFlow model's last forward pass, to score each feature scale on its own.

    A forward hook on the model's flow sees the latents the model scored, so nothing is computed twice; the score
    of one scale is the model's own image score (same ``top_k``, scoring and that scale's statistics) over that
    scale's latent alone.
    Other models (no ``flow`` and ``anomaly_map_generator``) are left untouched and :attr:`enabled` is false.

    Args:
        model: The torch model of an anomalib module.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.generator = getattr(model, "anomaly_map_generator", None)
        flow = getattr(model, "flow", None)
        self.enabled = self.generator is not None and flow is not None
        self.latents: list[torch.Tensor] = []
        self._handle = flow.register_forward_hook(self._keep) if self.enabled else None

    def _keep(self, module: torch.nn.Module, inputs: object, outputs: tuple[list[torch.Tensor], torch.Tensor]) -> None:
        del module, inputs
        self.latents = list(outputs[0])

    def scale_scores(self, image_size: Sequence[int]) -> np.ndarray:
        """Image score of every scale of the last batch.

        Args:
            image_size: ``(H, W)`` of the input.

        Returns:
            np.ndarray: ``(B, S)`` float64 scores.
        """
        columns = [
            self.generator([latent], image_size, scales=[index])[1].detach().cpu().double()
            for index, latent in enumerate(self.latents)
        ]
        return torch.stack(columns, dim=1).numpy()

    def scorings(self, image_size: Sequence[int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Map and image score of the last batch under each scoring the generator offers.

        The scorings that read tracked statistics are left out for a model whose statistics were never tracked.

        Args:
            image_size: ``(H, W)`` of the input.

        Returns:
            dict[str, tuple[np.ndarray, np.ndarray]]: Scoring -> float64 maps ``(B, H, W)`` and scores ``(B,)``.
        """
        results = {}
        for name in SCORINGS:
            if name in TRACKED_SCORINGS and int(self.generator.num_batches_tracked) == 0:
                continue
            generator = AnomalyMapGenerator(
                self.generator.top_k, image_score=name, pixel_map=name, num_scales=self.generator.running_mean.numel()
            ).to(self.generator.running_mean.device)
            generator.load_state_dict(self.generator.state_dict())
            anomaly_map, score = generator(self.latents, image_size)
            results[name] = (anomaly_map.detach().cpu().double()[:, 0].numpy(), score.detach().cpu().double().numpy())
        return results

    def remove(self) -> None:
        """Remove the hook."""
        if self._handle is not None:
            self._handle.remove()


def raw_metrics(outputs: dict[str, np.ndarray]) -> dict[str, float]:
    """Image AUROC, pixel AUROC and PRO of raw outputs, plus how many image scores are distinct.

    Args:
        outputs: See :func:`raw_outputs`.

    Returns:
        dict[str, float]: ``image_AUROC``, ``pixel_AUROC``, ``PRO``, ``distinct_image_scores``,
        ``image_AUROC_by_defect`` (defect type -> AUROC of its images against every normal one) and, with
        ``scale_scores``, ``image_AUROC_by_scale`` (one per feature scale, finest first) and, with ``scorings``,
        ``by_scoring``: scoring -> its ``image_AUROC``, ``pixel_AUROC`` and ``PRO``.
    """
    scores, labels, types = outputs["scores"], outputs["labels"], outputs["defect_types"]
    normal = labels == 0
    by_defect = {}
    for name in sorted(set(types[~normal])):
        chosen = normal | (types == name)
        by_defect[name] = auroc(scores[chosen], labels[chosen])
    metrics = {
        "image_AUROC": auroc(scores, labels),
        "pixel_AUROC": auroc(outputs["maps"], outputs["masks"]),
        "PRO": pro(outputs["maps"], outputs["masks"]),
        "distinct_image_scores": int(np.unique(scores).size),
        "image_AUROC_by_defect": by_defect,
    }
    if "scale_scores" in outputs:
        metrics["image_AUROC_by_scale"] = [auroc(column, labels) for column in outputs["scale_scores"].T]
    if "scorings" in outputs:
        metrics["by_scoring"] = {
            name: {
                "image_AUROC": auroc(scoring["scores"], labels),
                "pixel_AUROC": auroc(scoring["maps"], outputs["masks"]),
                "PRO": pro(scoring["maps"], outputs["masks"]),
            }
            for name, scoring in outputs["scorings"].items()
        }
    return metrics


def measure(
    module: AnomalibModule, dataloader: DataLoader, autocast_dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Evaluate raw outputs and time the evaluation.

    Args:
        module: The anomalib model.
        dataloader: Test data loader.
        autocast_dtype: See :func:`raw_outputs`.

    Returns:
        dict[str, Any]: ``metrics`` (see :func:`raw_metrics`), ``eval_s`` and ``eval_cpu_s``.
    """
    start, cpu_start = time.perf_counter(), cpu_seconds()
    metrics = raw_metrics(raw_outputs(module, dataloader, autocast_dtype))
    return {"metrics": metrics, "eval_s": time.perf_counter() - start, "eval_cpu_s": cpu_seconds() - cpu_start}


class EpochEvaluation(Callback):
    """Evaluate raw outputs on the test set at the end of the listed training epochs, off the training clock.

    Each point also carries the epoch's mean training loss (the ``loss`` every training step returned).

    Args:
        epochs: 1-based epochs after which to evaluate.
        dataloader: Factory of the test data loader.
        clock: The fit's training clock; paused while evaluating.
        autocast_dtype: See :func:`raw_outputs`.
    """

    def __init__(
        self,
        epochs: Sequence[int],
        dataloader: Callable[[], DataLoader],
        clock: TrainingClock,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.epochs = frozenset(epochs)
        self.dataloader = dataloader
        self.clock = clock
        self.autocast_dtype = autocast_dtype
        self.points: list[dict[str, Any]] = []
        self._losses: list[float] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: AnomalibModule) -> None:
        """Start collecting the epoch's training losses.

        Args:
            trainer: The trainer.
            pl_module: The model.
        """
        del trainer, pl_module
        self._losses = []

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: AnomalibModule,
        outputs: object,
        batch: object,
        batch_idx: int,
    ) -> None:
        """Keep the step's loss.

        Args:
            trainer: The trainer.
            pl_module: The model.
            outputs: What the training step returned.
            batch: The batch.
            batch_idx: Its index.
        """
        del trainer, pl_module, batch, batch_idx
        if isinstance(outputs, dict) and "loss" in outputs:
            self._losses.append(float(outputs["loss"]))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: AnomalibModule) -> None:
        """Evaluate after a listed epoch.

        Args:
            trainer: The trainer.
            pl_module: The model.
        """
        epoch = trainer.current_epoch + 1
        if epoch not in self.epochs:
            return
        with self.clock.paused():
            train_s, train_cpu_s = self.clock.elapsed()
            point = {"epoch": epoch, "train_s": train_s, "train_cpu_s": train_cpu_s}
            if self._losses:
                point["train_loss"] = float(np.mean(self._losses))
            self.points.append(point | measure(pl_module, self.dataloader(), self.autocast_dtype))


def _random_states() -> dict[str, Any]:
    """Capture Python's, NumPy's and torch's (CPU and CUDA) random states.

    Returns:
        dict[str, Any]: The states.
    """
    # The legacy global NumPy generator is the one seed_everything seeds and data pipelines may draw from.
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_random_states(states: dict[str, Any]) -> None:
    """Restore what :func:`_random_states` captured.

    Args:
        states: The states.
    """
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])  # noqa: NPY002
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])
