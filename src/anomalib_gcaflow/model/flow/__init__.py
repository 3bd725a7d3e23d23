"""Plain-torch GCAFlow normalizing flow: positional encoding, subnets, attention, couplings."""

from anomalib_gcaflow.model.flow.attention import (
    EfficientChannelAttention,
    GlobalContextAttention,
    SqueezeExcitation,
    build_channel_attention,
    eca_kernel_size,
)
from anomalib_gcaflow.model.flow.config import FlowConfig
from anomalib_gcaflow.model.flow.fusion import FusionAttnFlow, FusionSubnet
from anomalib_gcaflow.model.flow.hflow import HFlowBlock
from anomalib_gcaflow.model.flow.multiscale import MultiScaleFlow
from anomalib_gcaflow.model.flow.permutation import ChannelPermutation
from anomalib_gcaflow.model.flow.pointwise_conv import PointwiseConv2d
from anomalib_gcaflow.model.flow.positional import positional_encoding_2d
from anomalib_gcaflow.model.flow.positional_conv import PositionalConv2d
from anomalib_gcaflow.model.flow.subnets import HierarchicalSubnet, MSFlowSubnet

__all__ = [
    "ChannelPermutation",
    "EfficientChannelAttention",
    "FlowConfig",
    "FusionAttnFlow",
    "FusionSubnet",
    "GlobalContextAttention",
    "HFlowBlock",
    "HierarchicalSubnet",
    "MSFlowSubnet",
    "MultiScaleFlow",
    "PointwiseConv2d",
    "PositionalConv2d",
    "SqueezeExcitation",
    "build_channel_attention",
    "eca_kernel_size",
    "positional_encoding_2d",
]
