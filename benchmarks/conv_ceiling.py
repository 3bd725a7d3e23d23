"""How fast a step's convolutions run on their own: the ceiling that the rest of the step can only lower.

A training step of the flow is recorded once at the ATen level; every convolution it dispatched (forward
``aten.convolution`` and backward ``aten.convolution_backward``, with the step's own shapes, strides, dtypes and
memory layouts) is then replayed alone on fresh random tensors and timed. So is every 2-D matrix product
(``aten.mm``, ``aten.addmm``): on the CPU the H-Flow subnet's 1x1 output projection runs as one
(``PointwiseConv2d``), so it is a convolution computed another way. The sum over the step's calls is the time its
convolutions need by themselves; the step's measured time minus that sum is everything else (element-wise work,
copies, normalisation, reductions, framework overhead).
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.timing import measure_seconds

CONVOLUTION_OPS = (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default)
MATRIX_PRODUCT_OPS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
# Each op's kind and where its data operand sits (the weight follows it): convolution_backward(grad_output, input,
# weight, ...), convolution(input, weight, ...), mm(a, b), addmm(bias, a, b).
_KINDS = {
    torch.ops.aten.convolution_backward.default: ("backward", 1),
    torch.ops.aten.convolution.default: ("forward", 0),
    torch.ops.aten.mm.default: ("matrix product", 0),
    torch.ops.aten.addmm.default: ("matrix product", 1),
}


def _spec(value: object) -> object:
    """Describe an argument: a tensor by shape, dtype and layout; anything else as it is (hashable)."""
    if isinstance(value, torch.Tensor):
        layout = "channels_last" if value.dim() == 4 and value.is_contiguous(memory_format=torch.channels_last) else ""
        contiguous = layout or ("contiguous" if value.is_contiguous() else "strided")
        return ("tensor", tuple(value.shape), value.dtype, contiguous, value.device.type)
    if isinstance(value, list | tuple):
        return tuple(_spec(item) for item in value)
    return value


def _build(spec: object, generator: torch.Generator) -> object:
    """Make an argument from its description (random tensors of the recorded shape, dtype and layout)."""
    if isinstance(spec, tuple) and spec and spec[0] == "tensor":
        _, shape, dtype, layout, device = spec
        tensor = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
        return tensor.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else tensor
    if isinstance(spec, tuple):
        return [_build(item, generator) for item in spec]
    return spec


class ConvolutionRecorder(TorchDispatchMode):
    """Count every convolution (forward, backward) and matrix product dispatched while active, by op and arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[tuple[Any, ...]] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:  # noqa: ANN401
        """Record a convolution, then run whatever was dispatched.

        Args:
            func: The ATen op.
            types: Tensor subclasses involved.
            args: Positional arguments.
            kwargs: Keyword arguments.

        Returns:
            Any: The op's result.
        """
        del types
        kwargs = kwargs or {}
        if func in CONVOLUTION_OPS + MATRIX_PRODUCT_OPS and not kwargs:
            self.calls[(func, _spec(args))] += 1
        return func(*args, **kwargs)


def convolution_ceiling(
    step: Callable[[], object], device: str, peak_gflops: float, repeats: int = 2
) -> dict[str, Any]:
    """Record ``step``'s convolutions, time each alone and sum them over the step.

    Args:
        step (Callable[[], object]): One training (or inference) step; it runs once, untimed, to be recorded.
        device (str): Device, for synchronisation.
        peak_gflops (float): The peak of the step's precision, for each convolution's fraction of it.
        repeats (int, optional): Timed calls per convolution after one warm-up; the median counts. Defaults to 2.

    Returns:
        dict[str, Any]: ``convolutions`` (one row per distinct call: kind, input and weight shapes, dtype, layout,
        calls per step, GFLOP and ms per call, GFLOP/s, fraction of peak), ``conv_ms_per_step``,
        ``conv_gflop_per_step`` and ``conv_gflops`` (their ratio).
    """
    recorder = ConvolutionRecorder()
    with recorder:
        step()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for (func, spec), count in recorder.calls.items():
        args = _build(spec, generator)
        with FlopCounterMode(display=False) as counter:
            func(*args)
        seconds = statistics.median(measure_seconds(lambda func=func, args=args: func(*args), repeats, 1, device))
        gflop = counter.get_total_flops() / 1e9
        kind, data_index = _KINDS[func]
        data, weight = spec[data_index], spec[data_index + 1]
        rows.append({
            "kind": kind,
            "input_shape": list(data[1]),
            "weight_shape": list(weight[1]),
            "dtype": str(data[2]).removeprefix("torch."),
            "layout": data[3],
            "calls_per_step": count,
            "gflop": gflop,
            "ms": 1e3 * seconds,
            "gflops": gflop / seconds,
            "fraction_of_peak": gflop / seconds / peak_gflops,
        })
    rows.sort(key=lambda row: -row["calls_per_step"] * row["ms"])
    conv_ms = sum(row["calls_per_step"] * row["ms"] for row in rows)
    conv_gflop = sum(row["calls_per_step"] * row["gflop"] for row in rows)
    return {
        "convolutions": rows,
        "conv_ms_per_step": conv_ms,
        "conv_gflop_per_step": conv_gflop,
        "conv_gflops": conv_gflop / conv_ms * 1e3 if conv_ms else None,
    }
