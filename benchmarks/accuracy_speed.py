"""The accuracy benchmark's speed records, one per model of the grid, next to the machine's peak.

Each holds parameters, size, latency, throughput, GFLOP and peak training memory, measured in the process that runs
the grid.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch
from anomalib.models.components import AnomalibModule
from lightning.pytorch import seed_everything
from torch import nn

from benchmarks.data import bottle_root
from benchmarks.environment import machine
from benchmarks.flops import flow_gflop_per_image, model_gflop_per_image
from benchmarks.models import build_model, model_spec
from benchmarks.protocol import Settings
from benchmarks.rates import inference_timing, machine_peak_gflops
from benchmarks.records import mkdir, read_record, write_json
from benchmarks.shared_backbone import SharedBackbone
from benchmarks.training_cost import peak_training_memory_mb

logger = logging.getLogger("benchmarks.accuracy")

# PatchCore's inference cost grows with its memory bank; for speed it gets a bank as large as bottle's would be.
SPEED_PATCHCORE_TRAIN_IMAGES = 209
SPEED_BATCH = 16


def measure_all_speed(
    settings: Settings,
    backbone: SharedBackbone,
    failures: list[dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Measure (or reuse, when resuming) every model's speed record, with the machine's peak next to them.

    Args:
        settings: The invocation's settings.
        backbone: The shared backbone.
        failures: Where a failed measurement is reported (the others go on).

    Returns:
        dict[str, dict[str, Any]]: Speed record per model id.
    """
    folder = mkdir(settings.out / "speed")
    records: dict[str, dict[str, Any]] = {}
    peak: dict[str, Any] | None = None
    for name in settings.models:
        path = folder / f"{name}.json"
        record = read_record(path, settings.protocol)
        if record is None or record["sizes"] != list(settings.speed_sizes):
            logger.warning("speed of %s", name)
            peak = peak or machine_peak_gflops(settings.protocol.device, settings.speed_smoke, settings.speed_repeats)
            try:
                record = measure_speed(name, settings, backbone, peak)
            except Exception as error:  # one broken measurement must not cost the grid
                logger.exception("speed of %s failed; the grid goes on", name)
                failures.append({"model": name, "dataset": "speed", "seed": None, "error": repr(error)})
                continue
            finally:
                gc.collect()
            write_json(path, record)
        records[name] = record
    return records


def measure_speed(name: str, settings: Settings, backbone: SharedBackbone, peak: dict[str, Any]) -> dict[str, Any]:
    """Measure one model: parameters, size, latency (batch 1), throughput (batch 16), GFLOP, peak training memory.

    Args:
        name: Model id.
        settings: The invocation's settings.
        backbone: The shared backbone.
        peak: The machine's peak GFLOP/s, measured in this process.

    Returns:
        dict[str, Any]: The speed record.
    """
    protocol = settings.protocol
    record: dict[str, Any] = {
        "model": name,
        "protocol_digest": protocol.digest(),
        "sizes": list(settings.speed_sizes),
        "repeats": settings.speed_repeats,
        "machine_peak": peak,
        "machine": machine(protocol.device),
        "inference": {},
    }
    for size in settings.speed_sizes:
        seed_everything(0, verbose=False)
        model, _ = build_model(name, protocol, size, backbone)
        torch_model = _inference_ready(name, model, size).to(protocol.device)
        if size == protocol.image_size or "trainable_params" not in record:
            frozen = {id(p) for p in _backbone_module(name, torch_model).parameters()}
            # PatchCore's extractor leaves requires_grad on although nothing trains it: count outside the backbone.
            record["trainable_params"] = sum(
                p.numel() for p in torch_model.parameters() if p.requires_grad and id(p) not in frozen
            )
            record["size_mb"] = _stored_bytes(torch_model, _backbone_module(name, torch_model)) / 1e6
        shape = (size, size)
        single = inference_timing(torch_model, shape, 1, repeats=settings.speed_repeats)
        batched = inference_timing(torch_model, shape, SPEED_BATCH, repeats=settings.speed_repeats)
        gflop = model_gflop_per_image(torch_model, shape)
        record["inference"][str(size)] = {
            "latency_ms_b1": single["latency_ms"],
            "throughput_b16": batched["throughput"],
            "gflop_per_image": gflop,
            "gflop_per_image_after_backbone": flow_gflop_per_image(torch_model, shape),
            "achieved_gflops": gflop * batched["throughput"],
            "fraction_of_peak": gflop * batched["throughput"] / peak["gflops"],
            "timing_b1": single,
            "timing_b16": batched,
        }
        del model, torch_model
    class_path, kwargs = model_spec(name, protocol, protocol.image_size, backbone)
    record["peak_train_memory"] = {
        "image_size": protocol.image_size,
        "batch_size": protocol.train_batch_size,
        "batches": settings.memory_batches,
        "class": class_path,
        "init_args": kwargs,
    }
    record["peak_train_memory_mb"] = peak_training_memory_mb(
        class_path,
        kwargs,
        image_size=(protocol.image_size, protocol.image_size),
        batch_size=protocol.train_batch_size,
        data_root=bottle_root(settings),
        max_batches=settings.memory_batches,
        device=protocol.device,
    )
    return record


def _inference_ready(name: str, model: AnomalibModule, image_size: int) -> nn.Module:
    """Return the torch model in eval mode, with PatchCore's memory bank filled to bottle's size.

    Args:
        name: Model id.
        model: The freshly built model.
        image_size: Square input size.

    Returns:
        nn.Module: The torch model, ready for inference.
    """
    torch_model = model.model.eval()
    if name == "patchcore":
        # One patch per stride-8 position (PatchCore's first stage) of every training image, then the coreset.
        patches = SPEED_PATCHCORE_TRAIN_IMAGES * (image_size // 8) ** 2
        bank_size = int(patches * model.coreset_sampling_ratio)
        torch_model.memory_bank = torch.randn(bank_size, sum(torch_model.feature_extractor.out_dims))
    return torch_model


def _backbone_module(name: str, torch_model: nn.Module) -> nn.Module:
    """Return the frozen backbone inside a model's torch model.

    Args:
        name: Model id.
        torch_model: The torch model.

    Returns:
        nn.Module: Its backbone.
    """
    return torch_model.encoder if name == "cflow" else torch_model.feature_extractor


def _stored_bytes(torch_model: nn.Module, backbone: nn.Module) -> int:
    """Bytes of everything the model stores beyond the shared backbone (parameters and buffers).

    Args:
        torch_model: The torch model.
        backbone: Its backbone module.

    Returns:
        int: The byte count.
    """
    shared = {id(t) for t in backbone.state_dict(keep_vars=True).values()}
    return sum(
        t.numel() * t.element_size() for t in torch_model.state_dict(keep_vars=True).values() if id(t) not in shared
    )
