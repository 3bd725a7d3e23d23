"""PointwiseConv2d: a 1x1 convolution that a CPU computes as one matrix product over the channels-last view.

A 1x1 convolution is ``(N*H*W, C_in) @ (C_in, C_out)``. On channels-last input that matrix is the tensor's own memory,
so ``F.linear`` runs it as a single BLAS product with no copy. For the H-Flow subnet's output projection (a wide hidden
layer to the coupling's few log-scale and shift channels) oneDNN's convolution backward is slow on the CPU; the matrix
products' backward made the CPU recipe's whole fp32 training step (Lite0, batch 16) about 3 % faster, ad hoc on an AMX
Xeon (236 against 245 ms, five alternating rounds), and changed nothing beyond noise under bf16 autocast, at the paper's
scale or on an AVX2-only AMD EPYC (594 against 595 ms, four rounds). The same trick on the subnet's expansion layer
(narrow to wide) was slower, so only the projection uses it.

Elsewhere the module is a plain ``nn.Conv2d``: on accelerators, and while ``torch.compile``, ONNX export or TorchScript
trace the forward, so exported graphs keep their ``Conv`` node. Parameters and state-dict keys are ``nn.Conv2d``'s.
"""

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib_gcaflow.model.flow.tracing import is_tracing


class PointwiseConv2d(nn.Conv2d):
    """1x1 convolution with a bias, computed on the CPU as a matrix product over the channels-last view.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project every pixel's channel vector.

        Args:
            x (torch.Tensor): Input ``(B, in_channels, H, W)``.

        Returns:
            torch.Tensor: Output ``(B, out_channels, H, W)``; on the CPU channels-last in memory.
        """
        if x.device.type != "cpu" or is_tracing():
            return super().forward(x)
        return F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)
