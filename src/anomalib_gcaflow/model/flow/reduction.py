"""Reductions that stay in (at least) fp32 under autocast.

Per-image log-determinants and squared norms sum millions of terms of size ~1; in bf16/fp16 such sums lose all
precision (and overflow fp16), so they are always accumulated in fp32, or in the input's dtype if wider.
"""

import torch


def sum_per_sample(x: torch.Tensor) -> torch.Tensor:
    """Sum every axis but the batch axis, accumulating in at least fp32.

    Args:
        x (torch.Tensor): Tensor of shape ``(B, ...)``.

    Returns:
        torch.Tensor: Shape ``(B,)``, dtype fp32 (fp64 when ``x`` is fp64).
    """
    return x.flatten(1).sum(dim=1, dtype=torch.promote_types(x.dtype, torch.float32))
