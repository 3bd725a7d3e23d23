"""Channel gathers and clamps whose backward passes give torch's gradients in fewer passes over memory.

At the paper's scale the flow's training step is bounded by memory traffic, not arithmetic, wherever the CPU
multiplies fast (AMX, avx512_bf16): every extra pass over a ``(16, 256, 64, 64)`` tensor costs milliseconds.

* A channel permutation ``x[:, index]`` is differentiated by torch as a scatter: a zero-filled gradient plus an
  accumulating ``index_put_``. Since the index is a permutation, every input channel receives exactly one output
  channel's gradient, so gathering the gradient by the inverse permutation gives the same numbers in one pass.
* ``clamp`` saves its input and builds two comparison masks in backward. When every element lies strictly inside
  the bounds (always, for the flow's far-away latent limit on finite inputs), its gradient is the incoming gradient
  unchanged; one ``aminmax`` pass in forward decides that, and only otherwise is the mask built. On a GPU the
  decision reads two numbers back to the host, once per scale and training step.

Neither shortcut is taken where no gradient is needed, or while ``torch.compile`` or an exporter traces the graph
(see :mod:`tracing`).
"""

import torch

from anomalib_gcaflow.model.flow.tracing import is_tracing


class _PermuteChannels(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x[:, index]

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad[:, inverse], None, None


class _ClampLatents(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, limit: float) -> torch.Tensor:
        low, high = torch.aminmax(x)
        # Strictly inside, as clamp's gradient is zero at the bounds too; NaN fails the test and gets zero as well.
        inside = bool(low > -limit) and bool(high < limit)
        ctx.save_for_backward(None if inside else (x > -limit) & (x < limit))
        return x.clamp(-limit, limit)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (mask,) = ctx.saved_tensors
        return (grad if mask is None else torch.where(mask, grad, 0)), None


def _lean(x: torch.Tensor) -> bool:
    # torch.compile differentiates the plain operations itself, fused with their neighbours.
    return x.requires_grad and torch.is_grad_enabled() and not is_tracing()


def permute_channels(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Return ``x[:, index]``, differentiated by gathering with ``inverse`` instead of scattering.

    Args:
        x (torch.Tensor): Tensor ``(B, C, ...)``.
        index (torch.Tensor): A permutation of ``range(C)``.
        inverse (torch.Tensor): Its inverse, ``argsort(index)``.

    Returns:
        torch.Tensor: The permuted tensor.
    """
    return _PermuteChannels.apply(x, index, inverse) if _lean(x) else x[:, index]


def clamp_latents(x: torch.Tensor, limit: float) -> torch.Tensor:
    """Return ``x.clamp(-limit, limit)`` with the same gradient, built without masks when nothing was clamped.

    Args:
        x (torch.Tensor): Any tensor.
        limit (float): Positive bound of the magnitudes.

    Returns:
        torch.Tensor: The clamped tensor.
    """
    return _ClampLatents.apply(x, limit) if _lean(x) else x.clamp(-limit, limit)
