"""anomalib's Fastflow on the shared offline backbone, for the speed and accuracy benchmarks.

Fastflow's cost and accuracy depend on its backbone; comparing it with GCAFlow on a different one (anomalib only
builds it on ResNet and transformer hub weights, which cannot be downloaded here) would compare backbones, not
flows. Both benchmarks therefore build it through :class:`SharedBackboneFastflow`.
"""

from anomalib.metrics import Evaluator
from anomalib.models import Fastflow
from anomalib.models.image.fastflow.torch_model import create_fast_flow_block
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from torch import nn

from anomalib_gcaflow.model.backbones import build_backbone

# Fastflow's ResNet stages (stride 4/8/16), named by stride stage so that they map onto any backbone.
FASTFLOW_LAYERS = ("layer1", "layer2", "layer3")


class SharedBackboneFastflow(Fastflow):
    """anomalib's Fastflow on a backbone it does not accept, with everything else its own.

    Fastflow only takes ResNet and transformer backbones, loaded from the hub. Its flows and LayerNorms are built
    from the backbone's channels and strides alone, so the honest swap is: construct it on a weightless ResNet-18,
    then replace the feature extractor with the frozen pyramid of ``backbone`` (stride 4/8/16, as for ResNets) and
    rebuild the norms and flow blocks with anomalib's own ``create_fast_flow_block`` and Fastflow's own
    hyper-parameters. Loss, optimiser, anomaly map and score are untouched. A class (rather than a patched
    instance) so that a separate process (the peak-memory measurement) can build the same model by import path.

    Args:
        backbone (str, optional): Backbone name, see ``anomalib_gcaflow.model.backbones``.
            Defaults to ``"tf_efficientnet_lite0"``.
        weights_path (str | None, optional): Local backbone weights file. Defaults to ``None``.
        flow_steps (int, optional): Flow steps per scale. Defaults to 8.
        conv3x3_only (bool, optional): Only 3x3 convolutions in the subnets. Defaults to ``False``.
        hidden_ratio (float, optional): Hidden channels per input channel of the subnets. Defaults to 1.0.
        pre_processor (PreProcessor | bool, optional): Pre-processor; it fixes the input size. Defaults to ``True``.
        post_processor (PostProcessor | bool, optional): Post-processor. Defaults to ``True``.
        evaluator (Evaluator | bool, optional): Evaluator. Defaults to ``True``.
        visualizer (Visualizer | bool, optional): Visualizer. Defaults to ``True``.
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        weights_path: str | None = None,
        flow_steps: int = 8,
        conv3x3_only: bool = False,
        hidden_ratio: float = 1.0,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            backbone="resnet18",
            pre_trained=False,
            flow_steps=flow_steps,
            conv3x3_only=conv3x3_only,
            hidden_ratio=hidden_ratio,
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.backbone = backbone
        # Zero padding, as anomalib builds Fastflow's ResNets (GCAFlow's reflect padding is its own design).
        pyramid = build_backbone(
            backbone,
            weights_path=weights_path,
            layers=FASTFLOW_LAYERS,
            reflect_padding=False,
        )
        height, width = self.input_size
        shapes = [
            [channels, int(height / stride), int(width / stride)]
            for channels, stride in zip(pyramid.channels, pyramid.strides, strict=True)
        ]
        self.model.feature_extractor = pyramid
        self.model.norms = nn.ModuleList(nn.LayerNorm(shape, elementwise_affine=True) for shape in shapes)
        self.model.fast_flow_blocks = nn.ModuleList(
            create_fast_flow_block(
                input_dimensions=shape,
                conv3x3_only=conv3x3_only,
                hidden_ratio=hidden_ratio,
                flow_steps=flow_steps,
            )
            for shape in shapes
        )
