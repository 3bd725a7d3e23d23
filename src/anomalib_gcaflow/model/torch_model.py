"""GCAFlowModel: frozen backbone -> 2x average pooling -> MultiScaleFlow -> anomaly map and score.

MSFlow's pipeline (https://github.com/cool-xuan/msflow, MIT) with GCAFlow's flow (Liao et al., Sensors 2025,
https://doi.org/10.3390/s25103205).
"""

import logging
from collections.abc import Sequence
from typing import Any

import torch
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_gcaflow.model.anomaly_map import AnomalyMapGenerator
from anomalib_gcaflow.model.backbones import BackboneWeightsUnavailableError, build_backbone
from anomalib_gcaflow.model.flow import FlowConfig, MultiScaleFlow

logger = logging.getLogger(__name__)


class GCAFlowModel(nn.Module):
    """The GCAFlow network in plain torch.

    In training mode ``forward`` returns what the loss needs, ``(latents, log_det)``; in eval mode it returns
    anomalib's ``InferenceBatch(pred_score, anomaly_map)`` with the pixel map at the input's resolution.

    Args:
        backbone (str, optional): Feature extractor name (see ``anomalib_gcaflow.model.backbones``).
            Defaults to ``"wide_resnet50_2"`` (the paper's, torchvision V1 ImageNet weights).
        pre_trained (bool, optional): Load ImageNet weights (strictly; a failed load is an error).
            Defaults to ``True``.
        layers (Sequence[str] | None, optional): Backbone stages to use; ``None`` takes the backbone's
            stride-4/8/16 stages (WRN50 ``layer1``-``layer3``). Defaults to ``None``.
        weights_path (str | None, optional): Local weights file for the backbone instead of a download.
            Defaults to ``None``.
        flow_config (FlowConfig | None, optional): The flow's shape. Defaults to ``None``: a :class:`FlowConfig`
            built from ``flow_options``.
        top_k (float, optional): Fraction of pixels in the image score. Defaults to 0.03.
        image_score (str, optional): ``"msflow"`` (the paper's, normalised by the image's most likely pixel),
            ``"likelihood"`` (absolute), ``"standardized"`` (each scale in units of its spread over the training
            data) or ``"bounded"`` (each standardised scale bounded before the sum); see
            :class:`AnomalyMapGenerator`. Defaults to ``"msflow"``.
        pixel_map (str, optional): ``"msflow"``, ``"likelihood"``, ``"standardized"`` or ``"bounded"``, likewise.
            Defaults to ``"msflow"``.
        feature_noise (float, optional): Standard deviation of Gaussian noise added to the flow's input features in
            training mode, as a fraction of each channel's standard deviation in the batch; ``0`` adds none.
            Defaults to ``0.0``.
        **flow_options (Any): :class:`FlowConfig` options (``depths=(1, 1, 1)``, ...) when ``flow_config`` is not given,
            a shorthand for scripts.

    Raises:
        ValueError: If ``flow_config`` and ``flow_options`` are both given, if an option is out of range, or if
            the depths do not match the backbone's stages, if ``image_score`` or ``pixel_map`` is unknown, or
            ``feature_noise`` negative.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        pre_trained: bool = True,
        layers: Sequence[str] | None = None,
        weights_path: str | None = None,
        flow_config: FlowConfig | None = None,
        top_k: float = 0.03,
        image_score: str = "msflow",
        pixel_map: str = "msflow",
        feature_noise: float = 0.0,
        **flow_options: Any,  # noqa: ANN401 - FlowConfig's fields, each typed there
    ) -> None:
        super().__init__()
        if flow_config is not None and flow_options:
            msg = f"give the flow's options either in flow_config or as keywords, not both: got {sorted(flow_options)}"
            raise ValueError(msg)
        if not feature_noise >= 0:
            msg = f"feature_noise must be >= 0 (a fraction of each channel's std; 0 turns it off), got {feature_noise}"
            raise ValueError(msg)
        self.feature_noise = float(feature_noise)
        flow_config = FlowConfig(**flow_options) if flow_config is None else flow_config
        # Validate the cheap parts first, so a bad configuration never waits for a backbone download.
        self.anomaly_map_generator = AnomalyMapGenerator(top_k, image_score, pixel_map, len(flow_config.depths))
        # Weights that cannot be downloaded fail at first use, not here: the anomalib CLI builds the model while it
        # parses its arguments and would bury the message in its own report, and a checkpoint loaded afterwards
        # brings the backbone's weights anyway.
        # The failure's message, kept as text so the module stays picklable.
        self.missing_weights: str | None = None
        try:
            self.feature_extractor = build_backbone(
                backbone,
                pre_trained=pre_trained,
                weights_path=weights_path,
                layers=layers,
            )
        except BackboneWeightsUnavailableError as error:
            self.feature_extractor = build_backbone(backbone, pre_trained=False, layers=layers)
            self.missing_weights = str(error)
            self.register_load_state_dict_post_hook(_weights_loaded)
        if len(flow_config.depths) != len(self.feature_extractor.channels):
            msg = (
                f"depths {list(flow_config.depths)} must give one block count per backbone layer; backbone "
                f"{backbone!r} returns {len(self.feature_extractor.channels)} feature maps"
            )
            raise ValueError(msg)
        self.pool = nn.AvgPool2d(kernel_size=3, stride=2, padding=1)
        self.flow = MultiScaleFlow(self.feature_extractor.channels, flow_config)

    @torch.no_grad()
    def extract_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Run the frozen backbone and the 2x pooling: the flow's inputs, identical in every epoch.

        Args:
            images (torch.Tensor): Normalised images ``(B, 3, H, W)``.

        Returns:
            list[torch.Tensor]: One pooled feature map per scale.
        """
        self.check_backbone_weights()
        return [self.pool(feature) for feature in self.feature_extractor(images)]

    def check_backbone_weights(self) -> None:
        """Raise, after logging the message, if the backbone still lacks its pretrained weights.

        Raises:
            BackboneWeightsUnavailableError: The weights could not be downloaded and no checkpoint brought them.
        """
        if self.missing_weights is not None:
            logger.error(self.missing_weights)
            raise BackboneWeightsUnavailableError(self.missing_weights)

    def forward(
        self,
        images: torch.Tensor,
        features: Sequence[torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor] | InferenceBatch:
        """Score images.

        Args:
            images (torch.Tensor): Normalised images ``(B, 3, H, W)``.
            features (Sequence[torch.Tensor] | None, optional): Pooled features from :meth:`extract_features`
                computed earlier (e.g. by a training feature cache); skips the backbone. Defaults to ``None``.

        Returns:
            tuple[list[torch.Tensor], torch.Tensor] | InferenceBatch: ``(latents, log_det)`` in training mode,
            ``InferenceBatch(pred_score, anomaly_map)`` in eval mode.
        """
        if features is None:
            features = self.extract_features(images)
        if self.training and self.feature_noise > 0:
            features = [self._add_noise(feature) for feature in features]
        latents, log_det = self.flow(features)
        if self.training:
            self.anomaly_map_generator.track(latents)
            return latents, log_det
        anomaly_map, pred_score = self.anomaly_map_generator(latents, images.shape[-2:])
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    def _add_noise(self, features: torch.Tensor) -> torch.Tensor:
        # A flow trained on ~200 images learns sharp peaks around their exact feature vectors, and pixel scores
        # degrade as it does. Training on features blurred at a fixed fraction of each channel's spread is
        # smoothing the learned density (noise regularisation); the scale follows the channel so one fraction
        # suits every backbone and scale.
        spread = features.std(dim=(0, 2, 3), keepdim=True, correction=0)
        return features + self.feature_noise * spread * torch.randn_like(features)


def _weights_loaded(module: GCAFlowModel, incompatible_keys: nn.modules.module._IncompatibleKeys) -> None:
    """Forget a failed weights download once a state dict (a checkpoint) has filled in the backbone."""
    if not any("feature_extractor." in key for key in incompatible_keys.missing_keys):
        module.missing_weights = None
