"""Fixed random channel permutation (FrEIA's ``PermuteRandom``): log-det 0, exact inverse by gathering."""

from collections.abc import Sequence

import torch

from anomalib_gcaflow.model.flow.invertible import ShapePreservingModule
from anomalib_gcaflow.model.flow.lean_backward import permute_channels


class ChannelPermutation(ShapePreservingModule):
    """Shuffle channels with a permutation drawn once from torch's global RNG and saved in the state dict.

    Args:
        channels (int): Number of channels of the single input.
    """

    def __init__(self, channels: int) -> None:
        super().__init__([(channels,)])
        permutation = torch.randperm(channels)
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse", torch.argsort(permutation))

    def forward(
        self,
        x: Sequence[torch.Tensor],
        c: Sequence[torch.Tensor] | None = None,
        rev: bool = False,
        jac: bool = True,
    ) -> tuple[tuple[torch.Tensor], float]:
        """Permute (or, with ``rev``, un-permute) the channels.

        Args:
            x (Sequence[torch.Tensor]): One tensor ``(B, C, ...)``.
            c (Sequence[torch.Tensor] | None, optional): Unused; a permutation takes no condition.
            rev (bool, optional): Apply the inverse permutation. Defaults to ``False``.
            jac (bool, optional): Unused; the log-determinant of a permutation is 0. Defaults to ``True``.

        Returns:
            tuple[tuple[torch.Tensor], float]: The permuted tensor and a log-determinant of 0.
        """
        del c, jac
        index, inverse = (self.inverse, self.permutation) if rev else (self.permutation, self.inverse)
        return (permute_channels(x[0], index, inverse),), 0.0
