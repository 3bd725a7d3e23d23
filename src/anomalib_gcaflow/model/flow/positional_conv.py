"""Convolution over ``[x; positional encoding]`` with the encoding's share folded out of the per-image work.

A convolution is linear in its input channels, so ``conv([x; PE]) = conv_x(x) + conv_PE(PE)``, and with zero
padding this holds at the border too. ``conv_PE(PE)`` depends on the weights and the feature-map size only, never
on the image: it is computed once per forward instead of once per image as 64 extra input channels.

When no gradient is needed, the response is also reused across forwards. It is reused only while the weights are
*equal in value* to a snapshot taken when it was computed, so no way of writing them can leave it stale: optimiser
steps, ``.data`` writes, ``torch.nn.utils.vector_to_parameters``, ``AveragedModel``/EMA updates, ``load_state_dict``,
dtype and device moves and DDP's in-place broadcasts all change the values, and the comparison sees them. The
comparison reads ``out x 64 x k x k`` numbers against the ``out x 64 x k x k x H x W`` multiply-adds of the
convolution it saves (it is reused because, with a few feature channels against 64 encoding channels, the
encoding's convolution costs a large share of a no-grad forward); on CUDA it adds one host synchronisation per
convolution per forward.

On the CPU the input is copied to channels-last memory first. The coupling hands over a channel half of its input, a
strided NCHW view; oneDNN convolves channels-last input faster, forward and backward, by more than the copy costs
(measured on an AMX Xeon, 2 threads, fp32, batch 16 of Lite0's features: 5x5 convolutions of the finest scale 11.2
against 7.5 ms forward + backward, the CPU recipe's training step 268 against 244 ms; on an AVX2-only AMD EPYC the step
634 against 594 ms). The output is channels-last too, which the channel LayerNorm after it reads without a copy. Values
change by float rounding only (another kernel sums in another order). Graph captures (``torch.compile``, export) are
left to choose their own layouts, and other devices keep the input as it comes (not measured there).

``torch.compile``, ``torch.export``/ONNX export and TorchScript tracing never see the reuse: while they trace,
the response is recomputed and nothing is stored, so their graph holds ``conv_x(x) + conv(PE, weight_pos, bias)``
with the encoding as a constant of the traced feature-map size and no concatenation.
"""

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib_gcaflow.model.flow.positional import positional_encoding_2d
from anomalib_gcaflow.model.flow.tracing import is_tracing


class PositionalConv2d(nn.Module):
    """A ``kernel_size`` x ``kernel_size`` convolution whose input is ``x`` concatenated with a 2-D positional code.

    Args:
        in_channels (int): Channels of ``x`` (the positional code is added on top of these).
        out_channels (int): Output channels.
        kernel_size (int): Odd spatial kernel size; padding keeps the spatial size.
        pos_channels (int): Channels of the positional encoding; a positive multiple of 4.
        fold_positional (bool, optional): Compute the encoding's response once per forward instead of
            concatenating the encoding to every image. Both give the same result to float rounding.
            Defaults to ``True``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        pos_channels: int,
        fold_positional: bool = True,
    ) -> None:
        super().__init__()
        # One conv over in_channels + pos_channels inputs, stored as its two column blocks so that neither
        # forward path needs to slice (and copy) the weight.
        conv = nn.Conv2d(in_channels + pos_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.weight_x = nn.Parameter(conv.weight.detach()[:, :in_channels].clone())
        self.weight_pos = nn.Parameter(conv.weight.detach()[:, in_channels:].clone())
        self.bias = nn.Parameter(conv.bias.detach().clone())
        self.pos_channels = pos_channels
        self.padding = kernel_size // 2
        self.fold_positional = fold_positional
        # (key of the input, weight_pos and bias as they were, response); see the module docstring.
        self._cached_response: tuple[tuple, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def positional_encoding(self, x: torch.Tensor) -> torch.Tensor:
        """Return the ``(1, pos_channels, H, W)`` encoding matching ``x``'s spatial size, device and dtype.

        Args:
            x (torch.Tensor): Input batch ``(B, C, H, W)``.

        Returns:
            torch.Tensor: The positional encoding with a batch axis of one.
        """
        height, width = x.shape[-2:]
        return positional_encoding_2d(self.pos_channels, height, width, x.device, x.dtype)[None]

    def positional_response(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``conv_PE(PE) + bias`` for ``x``'s size: the part of the output shared by every image.

        Args:
            x (torch.Tensor): Input batch ``(B, C, H, W)``; only its size, device and dtype are used.

        Returns:
            torch.Tensor: Tensor of shape ``(1, out_channels, H, W)``.
        """
        reusable = not torch.is_grad_enabled() and not is_tracing()
        key = (tuple(x.shape[-2:]), x.device, x.dtype)
        if reusable and self._cached_response is not None:
            cached_key, weight, bias, response = self._cached_response
            if cached_key == key and _equal(weight, self.weight_pos) and _equal(bias, self.bias):
                return response
        response = F.conv2d(self.positional_encoding(x), self.weight_pos, self.bias, padding=self.padding)
        if reusable:
            self._cached_response = (key, self.weight_pos.detach().clone(), self.bias.detach().clone(), response)
        else:
            self._cached_response = None
        return response

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``[x; PE]``.

        Args:
            x (torch.Tensor): Input batch ``(B, in_channels, H, W)``.

        Returns:
            torch.Tensor: Output ``(B, out_channels, H, W)``.
        """
        if self.fold_positional:
            if x.device.type == "cpu" and not is_tracing():
                x = x.contiguous(memory_format=torch.channels_last)
            return F.conv2d(x, self.weight_x, None, padding=self.padding) + self.positional_response(x)
        encoding = self.positional_encoding(x).expand(x.shape[0], -1, -1, -1)
        weight = torch.cat((self.weight_x, self.weight_pos), dim=1)
        return F.conv2d(torch.cat((x, encoding), dim=1), weight, self.bias, padding=self.padding)


def _equal(snapshot: torch.Tensor, current: torch.Tensor) -> bool:
    """Tell whether ``current`` has the snapshot's dtype, device, shape and values (NaNs never compare equal)."""
    return snapshot.dtype == current.dtype and snapshot.device == current.device and torch.equal(snapshot, current)
