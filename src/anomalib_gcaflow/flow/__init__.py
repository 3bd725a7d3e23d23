"""Plain-torch GCAFlow normalizing flow: positional encoding, subnets, attention, couplings."""

from anomalib_gcaflow.flow.attention import (
    EfficientChannelAttention,
    GlobalContextAttention,
    SqueezeExcitation,
    build_channel_attention,
    eca_kernel_size,
)
from anomalib_gcaflow.flow.fusion import FusionAttnFlow, FusionSubnet
from anomalib_gcaflow.flow.hflow import HFlowBlock
from anomalib_gcaflow.flow.multiscale import MultiScaleFlow
from anomalib_gcaflow.flow.permutation import ChannelPermutation
from anomalib_gcaflow.flow.positional import positional_encoding_2d
from anomalib_gcaflow.flow.positional_conv import PositionalConv2d
from anomalib_gcaflow.flow.subnets import HierarchicalSubnet, MSFlowSubnet

__all__ = [
    "ChannelPermutation",
    "EfficientChannelAttention",
    "FusionAttnFlow",
    "FusionSubnet",
    "GlobalContextAttention",
    "HFlowBlock",
    "HierarchicalSubnet",
    "MSFlowSubnet",
    "MultiScaleFlow",
    "PositionalConv2d",
    "SqueezeExcitation",
    "build_channel_attention",
    "eca_kernel_size",
    "positional_encoding_2d",
]
