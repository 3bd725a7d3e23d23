"""Rates of the speed benchmarks: machine peak, inference latency and throughput, the flow's achieved GFLOP/s.

Also how far an autocast forward lies from the fp32 one, on the same features.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from anomalib_gcaflow import GCAFlowModel
from anomalib_gcaflow.model.flow import PositionalConv2d
from anomalib_gcaflow.model.loss import GCAFlowLoss
from anomalib_gcaflow.model.precision import cpu_accelerates_bf16
from benchmarks.conv_ceiling import convolution_ceiling
from benchmarks.flops import device_of
from benchmarks.timing import measure_seconds


def _dtype_name(autocast_dtype: torch.dtype | None) -> str:
    return "fp32" if autocast_dtype is None else f"autocast {str(autocast_dtype).removeprefix('torch.')}"


def autocast_context(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``'s type, or a no-op for ``None``.

    Args:
        device (torch.device | str): Device whose autocast to enter.
        dtype (torch.dtype | None): Autocast dtype, or ``None`` for full precision.

    Returns:
        contextlib.AbstractContextManager: The context.
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_precisions(device: str) -> list[str]:
    """Precisions worth measuring on a device: fp32 and the lower ones it computes natively.

    bf16 on a GPU or a CPU with bf16 instructions (elsewhere oneDNN emulates it at under 1 GFLOP/s), fp16 on a GPU.

    Args:
        device (str): ``"cpu"`` or ``"cuda"``.

    Returns:
        list[str]: Keys of :data:`PRECISION_DTYPES`.
    """
    if torch.device(device).type == "cuda":
        return ["fp32", "bf16", "fp16"]
    return ["fp32", "bf16"] if cpu_accelerates_bf16() else ["fp32"]


def machine_peak_gflops(device: str = "cpu", quick: bool = False, repeats: int = 5) -> dict[str, Any]:
    """Measure the machine's peak per precision: the best of torch's matrix multiply and a large dense 5x5 conv.

    Low precisions are measured in bf16 (and fp16 on a GPU), the convolution channels-last, the layout oneDNN and
    cuDNN run fastest in those types; only :func:`native_precisions` are measured (an emulated bf16 2048^3 matmul
    takes minutes).

    Args:
        device (str, optional): ``"cpu"`` or ``"cuda"``. Defaults to ``"cpu"``.
        quick (bool, optional): Small operands (a smoke test, not a peak). Defaults to ``False``.
        repeats (int, optional): Timed calls per operation; the fastest counts. Defaults to 5.

    Returns:
        dict[str, Any]: ``gflops`` (the fp32 peak), ``peak_by_precision`` (``"fp32"``, ``"bf16"`` and on a GPU
        ``"fp16"``: the best of matmul and conv), ``description``, every single rate (``matmul_fp32_gflops``,
        ``conv5x5_fp32_gflops``, ``matmul_bf16_gflops``, ``conv5x5_bf16_gflops``, ...) and the operand shapes.
    """
    gpu = torch.device(device).type == "cuda"
    size = 512 if quick else (8192 if gpu else 2048)
    batch, channels, side = (1, 64, 32) if quick else ((32, 256, 128) if gpu else (4, 256, 64))
    repeats = 2 if quick else repeats
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device)
    b = torch.randn(size, size, generator=generator).to(device)
    x = torch.randn(batch, channels, side, side, generator=generator).to(device)
    w = torch.randn(channels, channels, 5, 5, generator=generator).to(device)
    matmul_flop = 2 * size**3
    conv_flop = 2 * batch * channels * channels * 25 * side * side
    rates: dict[str, float] = {}
    peaks: dict[str, float] = {}
    with torch.inference_mode():
        for name in native_precisions(device):
            dtype = PRECISION_DTYPES[name]
            layout = torch.contiguous_format if dtype == torch.float32 else torch.channels_last
            a_, b_ = a.to(dtype), b.to(dtype)
            x_, w_ = x.to(dtype, memory_format=layout), w.to(dtype, memory_format=layout)
            matmul = matmul_flop / min(measure_seconds(lambda a_=a_, b_=b_: a_ @ b_, repeats, 1, device)) / 1e9
            conv_call = lambda x_=x_, w_=w_: F.conv2d(x_, w_, padding=2)  # noqa: E731
            conv = conv_flop / min(measure_seconds(conv_call, repeats, 1, device)) / 1e9
            rates[f"matmul_{name}_gflops"], rates[f"conv5x5_{name}_gflops"] = matmul, conv
            peaks[name] = max(matmul, conv)
    return {
        "gflops": peaks["fp32"],
        "peak_by_precision": peaks,
        "description": (
            f"best of matmul {size}x{size}x{size} and 5x5 conv {channels}->{channels} on "
            f"{batch}x{channels}x{side}x{side} (channels-last below fp32), per precision"
        ),
        **rates,
        "device": device,
        "threads": torch.get_num_threads(),
    }


def inference_timing(
    torch_model: nn.Module,
    image_size: Sequence[int],
    batch_size: int,
    repeats: int = 5,
    warmup: int = 1,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Time the eval forward (backbone, flow and post-processing) under ``torch.inference_mode``.

    Args:
        torch_model (nn.Module): A torch model taking normalised ``(B, 3, H, W)`` images, on its device.
        image_size (Sequence[int]): ``(H, W)``.
        batch_size (int): Images per forward.
        repeats (int, optional): Timed forwards; the median is reported. Defaults to 5.
        warmup (int, optional): Untimed forwards first (allocator, one-off constants). Defaults to 1.
        autocast_dtype (torch.dtype | None, optional): Run under autocast to this dtype. Defaults to ``None``.

    Returns:
        dict[str, Any]: ``latency_ms`` (median milliseconds per batch), ``latency_ms_min``, ``throughput``
        (images per second at the median), ``batch_size``, ``image_size``, ``repeats``.
    """
    device = device_of(torch_model)
    images = torch.randn(batch_size, 3, *image_size, device=device)
    was_training = torch_model.training
    torch_model.eval()
    try:
        with torch.inference_mode(), autocast_context(device, autocast_dtype):
            seconds = measure_seconds(lambda: torch_model(images), repeats, warmup, device)
    finally:
        torch_model.train(was_training)
    median = statistics.median(seconds)
    return {
        "batch_size": batch_size,
        "image_size": list(image_size),
        "repeats": repeats,
        "dtype": _dtype_name(autocast_dtype),
        "latency_ms": 1e3 * median,
        "latency_ms_min": 1e3 * min(seconds),
        "throughput": batch_size / median,
    }


def flow_forward_rate(
    model: GCAFlowModel,
    image_size: Sequence[int],
    batch_size: int,
    repeats: int = 5,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    compiled: bool = False,
    train: bool = False,
    ceiling_peak: float | None = None,
) -> dict[str, Any]:
    """Achieved GFLOP/s of GCAFlow's whole flow (parallel stacks and fusion) on precomputed features.

    Args:
        model (GCAFlowModel): The model; only its backbone (to make features) and its flow are used.
        image_size (Sequence[int]): ``(H, W)`` of the images the features come from.
        batch_size (int): Images per call.
        repeats (int, optional): Timed calls; the median is reported. Defaults to 5.
        autocast_dtype (torch.dtype | None, optional): Run under autocast to this dtype. Defaults to ``None``.
        channels_last (bool, optional): Give the flow channels-last features. Defaults to ``False``.
        compiled (bool, optional): Run the flow through ``torch.compile`` (compilation is in the warm-up).
            Defaults to ``False``.
        train (bool, optional): Time a training forward + NLL + backward instead of an inference forward.
            Defaults to ``False``.
        ceiling_peak (float | None, optional): Also time the step's convolutions alone
            (:func:`benchmarks.conv_ceiling.convolution_ceiling`) against this peak and report what the rest of the
            step costs (``conv_ceiling``, ``non_conv_ms``). Defaults to ``None`` (not measured).

    Returns:
        dict[str, Any]: Settings, ``gflop_per_batch``, ``ms_median``, ``ms_min``, ``gflops`` (at the median) and
        ``gflops_best``.
    """
    device = device_of(model.flow)
    with torch.no_grad():
        features = model.extract_features(torch.randn(batch_size, 3, *image_size, device=device))
    if channels_last:
        features = [feature.contiguous(memory_format=torch.channels_last) for feature in features]
    # Static shapes: automatic dynamic shapes make inductor fail on the flow (see GCAFlow's compile_flow).
    flow = torch.compile(model.flow, dynamic=False) if compiled else model.flow
    training = training_step(model.flow, features, autocast_dtype, flow)

    def inference(grad_mode: Callable[[], contextlib.AbstractContextManager] = torch.inference_mode) -> None:
        with grad_mode(), autocast_context(device, autocast_dtype):
            flow(features)

    step = training if train else inference
    model.flow.train(train)
    try:
        step()  # warm-up (and compilation) outside the count
        with FlopCounterMode(display=False) as counter:
            # The counter's module tracker needs autograd nodes, which inference_mode does not make.
            training() if train else inference(torch.no_grad)
        # Two untimed calls are behind us (allocator and caches are warm): at the paper's scale each costs a minute.
        seconds = measure_seconds(step, repeats, 0, device)
        ceiling = None if ceiling_peak is None else convolution_ceiling(step, str(device), ceiling_peak)
    finally:
        model.flow.eval()
    flop = counter.get_total_flops()
    median = statistics.median(seconds)
    extra = {}
    if ceiling is not None:
        extra = {"conv_ceiling": ceiling, "non_conv_ms": 1e3 * median - ceiling["conv_ms_per_step"]}
    return extra | {
        "mode": "train fwd+bwd" if train else "inference fwd",
        "dtype": _dtype_name(autocast_dtype),
        "channels_last": channels_last,
        "compiled": compiled,
        "fold_positional": any(isinstance(m, PositionalConv2d) and m.fold_positional for m in model.flow.modules()),
        "batch_size": batch_size,
        "image_size": list(image_size),
        "gflop_per_batch": flop / 1e9,
        "ms_median": 1e3 * median,
        "ms_min": 1e3 * min(seconds),
        "gflops": flop / median / 1e9,
        "gflops_best": flop / min(seconds) / 1e9,
    }


def training_step(
    flow: nn.Module,
    features: Sequence[torch.Tensor],
    autocast_dtype: torch.dtype | None = None,
    call: Callable[..., Any] | None = None,
) -> Callable[[], None]:
    """One training step of a flow on fixed features: forward and NLL (under autocast) and backward.

    Args:
        flow (nn.Module): The flow, whose gradients are cleared after each step.
        features (Sequence[torch.Tensor]): Its inputs.
        autocast_dtype (torch.dtype | None, optional): Autocast dtype, ``None`` for full precision.
            Defaults to ``None``.
        call (Callable[..., Any] | None, optional): What to call instead of ``flow`` (its compiled form).
            Defaults to ``None``.

    Returns:
        Callable[[], None]: The step.
    """
    device = features[0].device
    loss = GCAFlowLoss()
    call = flow if call is None else call

    def step() -> None:
        with autocast_context(device, autocast_dtype):
            value = loss(*call(features))
        value.backward()
        flow.zero_grad(set_to_none=True)

    return step


def autocast_deviation(
    model: GCAFlowModel,
    image_size: Sequence[int],
    batch_size: int,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, Any]:
    """How far an autocast forward is from the fp32 one, on the same features.

    Args:
        model (GCAFlowModel): The model (its flow is untrained here, so this is a numerical check, not AUROC).
        image_size (Sequence[int]): ``(H, W)``.
        batch_size (int): Images compared.
        dtype (torch.dtype, optional): Autocast dtype. Defaults to ``torch.bfloat16``.

    Returns:
        dict[str, Any]: Latent error relative to the latents' RMS, log-det relative error, NLL difference in nats
        per dimension, image-score and anomaly-map maximum differences, and the dtypes of the reductions.
    """
    device = device_of(model)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, *image_size, generator=generator).to(device)
    model.eval()
    with torch.inference_mode():
        features = model.extract_features(images)
        reference_latents, reference_log_det = model.flow(features)
        reference = model(images, features=features)
        with autocast_context(device, dtype):
            latents, log_det = model.flow(features)
            scored = model(images, features=features)
        latent_error = max(
            ((z.float() - z_ref).abs().max() / z_ref.square().mean().sqrt()).item()
            for z, z_ref in zip(latents, reference_latents, strict=True)
        )
        nll = GCAFlowLoss.per_dimension(GCAFlowLoss.per_image(latents, log_det), latents)
        reference_nll = GCAFlowLoss.per_dimension(GCAFlowLoss.per_image(reference_latents, reference_log_det), latents)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "latent_max_error_over_rms": latent_error,
        "log_det_max_relative_error": ((log_det - reference_log_det).abs() / reference_log_det.abs()).max().item(),
        "nll_per_dim_max_abs_diff": (nll - reference_nll).abs().max().item(),
        "score_max_abs_diff": (scored.pred_score - reference.pred_score).abs().max().item(),
        "anomaly_map_max_abs_diff": (scored.anomaly_map - reference.anomaly_map).abs().max().item(),
        "log_det_dtype": str(log_det.dtype).removeprefix("torch."),
        "nll_dtype": str(nll.dtype).removeprefix("torch."),
    }
