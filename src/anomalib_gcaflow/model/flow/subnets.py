"""Coupling subnets of the parallel flow blocks: GCAFlow's hierarchical subnet and MSFlow's original one.

Both see the passive half of a block's input together with the positional encoding and return the log-scale and
shift of the active half. Both start with a convolution over ``[x; PE]``, which :class:`PositionalConv2d` folds.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from torch import nn

from anomalib_gcaflow.model.flow.norm import ChannelLayerNorm
from anomalib_gcaflow.model.flow.pointwise_conv import PointwiseConv2d
from anomalib_gcaflow.model.flow.positional_conv import PositionalConv2d

if TYPE_CHECKING:  # config.py imports this module to validate names
    from anomalib_gcaflow.model.flow.config import FlowConfig

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class HierarchicalSubnet(nn.Sequential):
    """H-Flow subnet: dense k x k conv -> channel LayerNorm -> 1x1 expansion by alpha -> activation -> 1x1.

    A spatial stage followed by a point-wise inverted bottleneck (ConvNeXt's block without its residual, since
    input and output widths differ). With ``c = in_channels + pos_channels``, widths are c -> c -> alpha*c -> out.

    Args:
        in_channels (int): Channels of the passive half ``x_a``.
        out_channels (int): Channels of the output, twice the active half (log-scale and shift).
        pos_channels (int): Channels of the positional encoding concatenated to ``x_a``.
        kernel_size (int, optional): Kernel of the dense spatial convolution (3, 5 or 7 in the paper). Defaults to 5.
        expansion (int, optional): Hidden-width factor alpha of the point-wise stage. Defaults to 4.
        activation (str, optional): ``"gelu"`` (ConvNeXt's) or ``"relu"``. Defaults to ``"gelu"``.
        fold_positional (bool, optional): See :class:`PositionalConv2d`. Defaults to ``True``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        pos_channels: int,
        kernel_size: int = 5,
        expansion: int = 4,
        activation: str = "gelu",
        fold_positional: bool = True,
    ) -> None:
        width = in_channels + pos_channels
        super().__init__(
            PositionalConv2d(in_channels, width, kernel_size, pos_channels, fold_positional),
            ChannelLayerNorm(width),
            nn.Conv2d(width, expansion * width, 1),
            ACTIVATIONS[activation](),
            PointwiseConv2d(expansion * width, out_channels),
        )

    @classmethod
    def constructor(cls, config: FlowConfig) -> Callable[[int, int], nn.Module]:
        """Bind the flow's options, leaving ``(in_channels, out_channels)`` for the coupling block to give.

        Args:
            config (FlowConfig): The flow's options.

        Returns:
            Callable[[int, int], nn.Module]: The subnet constructor.
        """
        return partial(
            cls,
            pos_channels=config.pos_embed_dim,
            kernel_size=config.kernel_size,
            expansion=config.expansion,
            activation=config.activation,
            fold_positional=config.fold_positional,
        )


class MSFlowSubnet(nn.Sequential):
    """MSFlow's subnet: 3x3 conv -> channel LayerNorm -> ReLU -> 3x3 conv, over ``[x_a; PE]``.

    Args:
        in_channels (int): Channels of the passive half ``x_a``.
        out_channels (int): Channels of the output, twice the active half (log-scale and shift).
        pos_channels (int): Channels of the positional encoding concatenated to ``x_a``.
        fold_positional (bool, optional): See :class:`PositionalConv2d`. Defaults to ``True``.
    """

    def __init__(self, in_channels: int, out_channels: int, pos_channels: int, fold_positional: bool = True) -> None:
        width = in_channels + pos_channels
        super().__init__(
            PositionalConv2d(in_channels, width, 3, pos_channels, fold_positional),
            ChannelLayerNorm(width),
            nn.ReLU(),
            nn.Conv2d(width, out_channels, 3, padding=1),
        )

    @classmethod
    def constructor(cls, config: FlowConfig) -> Callable[[int, int], nn.Module]:
        """Bind the flow's options, leaving ``(in_channels, out_channels)`` for the coupling block to give.

        Args:
            config (FlowConfig): The flow's options (kernel, expansion and activation are the H-Flow subnet's).

        Returns:
            Callable[[int, int], nn.Module]: The subnet constructor.
        """
        return partial(cls, pos_channels=config.pos_embed_dim, fold_positional=config.fold_positional)


SUBNETS: dict[str, type[HierarchicalSubnet | MSFlowSubnet]] = {
    "hierarchical": HierarchicalSubnet,
    "msflow": MSFlowSubnet,
}
