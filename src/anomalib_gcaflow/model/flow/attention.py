"""Channel attention for the fusion subnets: GCA (the paper's), and ECA, SE or none for its ablation (Table 8).

Every module maps ``(B, C, H, W) -> (B, C, H, W)`` by reweighting channels with weights in ``(0, 1)``. They are
only ever used inside coupling subnets, so any of them keeps the flow exactly invertible with a closed-form
log-determinant.
"""

import math

import torch
from torch import nn


def eca_kernel_size(channels: int, gamma: int = 2, beta: int = 1) -> int:
    """Return ECA's adaptive 1-D kernel size psi(C) = |(log2 C + beta) / gamma|, rounded up to odd.

    Args:
        channels (int): Number of channels C.
        gamma (int, optional): Slope of the mapping. Defaults to 2.
        beta (int, optional): Offset of the mapping. Defaults to 1.

    Returns:
        int: An odd kernel size (5 for C = 896).
    """
    size = int(abs((math.log2(channels) + beta) / gamma))
    return size if size % 2 else size + 1


class EfficientChannelAttention(nn.Module):
    """ECA: pool each channel to one value, mix neighbouring channels with a bias-free 1-D conv, sigmoid gate.

    The 1-D kernel has size psi(C), so channel interaction grows with the width without a bottleneck. ECA pools
    by a plain spatial mean; :class:`GlobalContextAttention` replaces only the pooling.

    Args:
        channels (int): Number of input channels C.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        kernel_size = eca_kernel_size(channels)
        self.channel_mixing = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Summarise every channel of ``x`` ``(B, C, H, W)`` by one value, ``(B, C)``.

        Args:
            x (torch.Tensor): Input batch.

        Returns:
            torch.Tensor: The spatial mean per channel.
        """
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reweight the channels of ``x``.

        Args:
            x (torch.Tensor): Input ``(B, C, H, W)``.

        Returns:
            torch.Tensor: ``x`` times per-image, per-channel weights in ``(0, 1)``.
        """
        batch, channels = x.shape[:2]
        gate = self.channel_mixing(self.pool(x).unsqueeze(1)).sigmoid()  # (B, 1, C)
        return x * gate.view(batch, channels, 1, 1)


class GlobalContextAttention(EfficientChannelAttention):
    """GCA: ECA whose per-channel summary is a global context gathered by softmax spatial attention.

    A 1x1 conv gives one logit per position, a softmax over all H*W positions turns them into attention
    weights, and each channel's context is its attention-weighted sum (GCNet's context block). The ECA 1-D conv
    of size psi(C) and the sigmoid gate then reweight the input's channels.

    Args:
        channels (int): Number of input channels C.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.context_logits = nn.Conv2d(channels, 1, kernel_size=1)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Attention-weighted sum of every channel over all positions.

        Args:
            x (torch.Tensor): Input ``(B, C, H, W)``.

        Returns:
            torch.Tensor: Context ``(B, C)``.
        """
        weights = self.context_logits(x).flatten(1).softmax(dim=-1)  # (B, HW)
        return torch.bmm(x.flatten(2), weights.unsqueeze(-1)).squeeze(-1)


class SqueezeExcitation(nn.Module):
    """SE: global average pooling, a bottleneck of two fully connected layers, sigmoid gate.

    Args:
        channels (int): Number of input channels C.
        reduction (int, optional): Bottleneck ratio. Defaults to 16.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.excitation = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reweight the channels of ``x``.

        Args:
            x (torch.Tensor): Input ``(B, C, H, W)``.

        Returns:
            torch.Tensor: ``x`` times per-image, per-channel weights in ``(0, 1)``.
        """
        return x * self.excitation(x.mean(dim=(2, 3), keepdim=True))


ATTENTIONS: dict[str, type[nn.Module] | None] = {
    "gca": GlobalContextAttention,
    "eca": EfficientChannelAttention,
    "se": SqueezeExcitation,
    "none": None,
}


def build_channel_attention(kind: str, channels: int) -> nn.Module:
    """Create the channel attention named ``kind``.

    Args:
        kind (str): One of ``"gca"``, ``"eca"``, ``"se"``, ``"none"``.
        channels (int): Number of channels it reweights.

    Returns:
        nn.Module: The attention module (``nn.Identity`` for ``"none"``).

    Raises:
        ValueError: If ``kind`` is unknown.
    """
    if kind not in ATTENTIONS:
        msg = f"attention must be one of {sorted(ATTENTIONS)}, got {kind!r}"
        raise ValueError(msg)
    attention = ATTENTIONS[kind]
    return nn.Identity() if attention is None else attention(channels)
