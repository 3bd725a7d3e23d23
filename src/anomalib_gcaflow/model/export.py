"""OpenVINO IRs that compute in fp32 on every device unless reduced precision is asked for at export.

OpenVINO's CPU plugin runs fp32 models in bf16 on CPUs that accelerate it (AVX512_BF16, AMX), and its GPU plugin in
f16, unless the application passes an inference-precision hint when it compiles the model. anomalib's
``OpenVINOInferencer`` passes none, and OpenVINO 2026.4's CPU plugin ignores an ``INFERENCE_PRECISION_HINT`` stored
in the IR's ``runtime_options`` (it reads only the KV-cache entries there). What every plugin does honour is the
per-operation attribute ``DisableFP16Compression`` (type name ``precise``): an operation carrying it keeps its
original precision. Marking every operation makes the IR's scores the same on every CPU.
"""

from __future__ import annotations

from pathlib import Path
from tempfile import TemporaryDirectory

# "f32": every operation pinned to fp32. "auto": the runtime's own choice (bf16 on CPUs with AVX512_BF16 or AMX,
# f16 on GPUs, fp32 elsewhere), faster but machine-dependent.
OPENVINO_INFERENCE_PRECISIONS = ("f32", "auto")
# The string form of ov::DisableFP16Compression's type info; save_model writes it as the IR attribute.
_KEEP_ORIGINAL_PRECISION = "precise_0"


def check_inference_precision(inference_precision: str) -> None:
    """Reject an unknown OpenVINO inference precision before any export work starts.

    Args:
        inference_precision (str): The requested precision.

    Raises:
        ValueError: ``inference_precision`` is not one of ``OPENVINO_INFERENCE_PRECISIONS``.
    """
    if inference_precision not in OPENVINO_INFERENCE_PRECISIONS:
        msg = (
            f"inference_precision must be one of {', '.join(map(repr, OPENVINO_INFERENCE_PRECISIONS))}, "
            f"got {inference_precision!r}"
        )
        raise ValueError(msg)


def pin_openvino_fp32(xml_path: Path) -> None:
    """Rewrite an OpenVINO IR so that every plugin computes each of its operations in fp32.

    The weights are written back as they were read (fp16-compressed weights stay compressed).

    Args:
        xml_path (Path): The IR's ``.xml`` file; its ``.bin`` sits beside it. Both are replaced.
    """
    import openvino as ov

    model = ov.Core().read_model(xml_path)
    for operation in model.get_ops():
        operation.get_rt_info()[_KEEP_ORIGINAL_PRECISION] = ""
    # Written beside the original and then renamed over it: read_model maps the .bin it is reading.
    with TemporaryDirectory(dir=xml_path.parent) as directory:
        pinned = Path(directory) / xml_path.name
        ov.save_model(model, pinned, compress_to_fp16=False)
        del model
        for suffix in (".bin", ".xml"):
            pinned.with_suffix(suffix).replace(xml_path.with_suffix(suffix))
