"""Whether a forward pass is being traced into a graph, where Python-side shortcuts must not run."""

import torch


def is_tracing() -> bool:
    """Tell whether ``torch.compile``, ONNX export or TorchScript tracing is recording the current forward pass.

    They record tensor operations only: a tensor cached across calls would be baked into the graph as a constant, a
    branch on a tensor's value would be fixed at the traced value (or break the graph), and a custom autograd
    function would be an opaque Python operation to an exporter.

    Returns:
        bool: ``True`` inside ``torch.compile``, ``torch.onnx.export`` or ``torch.jit.trace``.
    """
    return torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
