"""Whether a forward pass is being traced into a graph for export, where Python-side shortcuts must not run."""

import torch


def is_exporting() -> bool:
    """Tell whether ONNX export or TorchScript tracing is recording the current forward pass.

    Both record tensor operations only: a tensor cached across calls would be baked into the graph as a constant,
    and a custom autograd function would be recorded as an opaque Python operation no runtime can execute.

    Returns:
        bool: ``True`` inside ``torch.onnx.export`` or ``torch.jit.trace``.
    """
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
