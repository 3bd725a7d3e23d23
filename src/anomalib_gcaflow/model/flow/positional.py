"""2-D sine/cosine positional encoding, the condition of every H-Flow block.

The first half of the channels encodes the column index and is constant along rows; the second half encodes the
row index and is constant along columns. Inside each half, even channels hold ``sin(pos * omega)`` and odd
channels ``cos(pos * omega)``, with geometric frequencies ``omega_j = 10000 ** (-2j / (channels / 2))``.
This is the CFlow-AD / MSFlow encoding, so a model trained with either sees the same condition.
"""

import math

import torch


def positional_encoding_2d(
    channels: int,
    height: int,
    width: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Build the encoding for one feature-map size.

    Args:
        channels (int): Number of encoding channels; a positive multiple of 4.
        height (int): Number of rows of the feature map.
        width (int): Number of columns of the feature map.
        device (torch.device | str | None, optional): Device of the result. Defaults to ``None`` (CPU).
        dtype (torch.dtype, optional): Floating dtype of the result. Defaults to ``torch.float32``.

    Returns:
        torch.Tensor: Encoding of shape ``(channels, height, width)``, identical for every image.

    Raises:
        ValueError: If ``channels`` is not a positive multiple of 4 or a size is not positive.
    """
    if channels <= 0 or channels % 4 != 0:
        msg = f"positional encoding channels must be a positive multiple of 4, got {channels}"
        raise ValueError(msg)
    if height <= 0 or width <= 0:
        msg = f"positional encoding needs a positive feature-map size, got {height}x{width}"
        raise ValueError(msg)
    half = channels // 2
    # Frequencies are computed in float64 so that the fp32 result is the same on every device.
    omega = torch.exp(torch.arange(0, half, 2, dtype=torch.float64) * (-math.log(10000.0) / half))
    cols = torch.arange(width, dtype=torch.float64)[:, None] * omega  # (W, half/2)
    rows = torch.arange(height, dtype=torch.float64)[:, None] * omega  # (H, half/2)
    # Interleave sin/cos so that channel 2j is sin and 2j+1 is cos of the same frequency.
    col_code = torch.stack((cols.sin(), cols.cos()), dim=-1).reshape(width, half).T  # (half, W)
    row_code = torch.stack((rows.sin(), rows.cos()), dim=-1).reshape(height, half).T  # (half, H)
    encoding = torch.cat(
        (col_code[:, None, :].expand(half, height, width), row_code[:, :, None].expand(half, height, width)),
        dim=0,
    )
    return encoding.to(device=device, dtype=dtype)
