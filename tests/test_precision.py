"""bf16 on CPUs (``--trainer.precision bf16-mixed``) and the fp32 pin of OpenVINO exports.

bf16 keeps 8 significant bits, a relative rounding error of up to 2**-8 = 0.4 % per value. Under CPU autocast the
flow's convolutions run in bf16, so every log-scale and latent carries that error; the reductions (log-det, squared
norm, score) must still accumulate in fp32, or sums of ~1e4 terms would lose all precision. The tolerances below
follow from that: a few bf16 roundings per latent dimension, not an error that grows with the number of terms.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import openvino
import pytest
import torch
from lightning.pytorch import Trainer
from torchvision.io import read_image

from anomalib_gcaflow import GCAFlow
from anomalib_gcaflow.model import lightning_model, precision
from anomalib_gcaflow.model.export import check_inference_precision, pin_openvino_fp32

LITE0 = "tf_efficientnet_lite0"
# Nats per latent dimension; measured 2e-3 (log-det) and 3e-2 (loss, whose squared norms double bf16's error) on
# the model below, on an AVX512_BF16 CPU.
LOG_DET_ATOL_PER_DIM = 1e-2
LOSS_RTOL = 2e-2
# Image scores are differences of log-likelihoods summed over channels and scales, in nats: each latent's 0.4 %
# reaches the score as a few % of it (measured up to 8 % on the model below); what must survive is the ranking of
# normal against defective images. Maps are per-image likelihood differences, compared relative to each map's
# maximum (measured 0.12: maps follow exp of squared latents, which magnify bf16's error).
SCORE_RTOL = 0.15
MAP_RTOL = 0.25


@pytest.fixture(scope="module")
def trained_and_images(mvtec_root: Path) -> tuple[GCAFlow, torch.Tensor]:
    """A GCAFlow whose flow is fitted for 40 Adam steps to 16 real bottle images, and 6 pre-processed test images."""
    torch.manual_seed(0)
    model = GCAFlow(backbone=LITE0, image_size=[128, 128], depths=[1, 1, 1], warmup_epochs=0)
    bottle = mvtec_root / "bottle"

    def load(paths: list[Path]) -> torch.Tensor:
        return model.pre_processor.transform(torch.stack([read_image(str(path)).float() / 255 for path in paths]))

    train = load(sorted((bottle / "train" / "good").glob("*.png"))[:16])
    test_files = sorted((bottle / "test" / "good").glob("*.png"))[:3]
    test_files += sorted((bottle / "test" / "broken_large").glob("*.png"))[:3]
    features = model.model.extract_features(train)
    optimizer = torch.optim.Adam(model.model.flow.parameters(), lr=1e-3)
    model.model.train()
    for _ in range(40):
        loss = model.loss(*model.model.flow(features))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, load(test_files)


@pytest.mark.slow  # fits the flow on real images (about 20 s)
def test_bf16_autocast_keeps_log_det_and_loss_in_fp32_within_tolerance(
    trained_and_images: tuple[GCAFlow, torch.Tensor],
) -> None:
    """Under CPU bf16 autocast the log-det and loss are fp32 and within the stated tolerance of fp32 runs."""
    model, images = trained_and_images
    model.model.train()
    with torch.no_grad():
        latents, log_det = model.model(images)
        loss = model.loss.per_image(latents, log_det)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            latents_bf16, log_det_bf16 = model.model(images)
            loss_bf16 = model.loss.per_image(latents_bf16, log_det_bf16)
    assert log_det_bf16.dtype == torch.float32
    assert loss_bf16.dtype == torch.float32
    dims = sum(z[0].numel() for z in latents)
    assert ((log_det_bf16 - log_det).abs() / dims).max() <= LOG_DET_ATOL_PER_DIM
    assert ((loss_bf16 - loss).abs() / loss.abs()).max() <= LOSS_RTOL


@pytest.mark.slow  # fits the flow on real images (about 20 s)
def test_bf16_autocast_scores_and_maps_are_fp32_within_tolerance(
    trained_and_images: tuple[GCAFlow, torch.Tensor],
) -> None:
    """Under CPU bf16 autocast, image scores and anomaly maps are fp32 and close to the fp32 ones."""
    model, images = trained_and_images
    model.model.eval()
    with torch.no_grad():
        output = model.model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output_bf16 = model.model(images)
    assert output_bf16.pred_score.dtype == torch.float32
    assert output_bf16.anomaly_map.dtype == torch.float32
    assert torch.all((output_bf16.pred_score - output.pred_score).abs() <= SCORE_RTOL * output.pred_score)
    normal, defective = output.pred_score[:3], output.pred_score[3:]
    assert normal.max() < defective.min(), "the test needs fp32 scores that separate the two kinds of image"
    assert output_bf16.pred_score[:3].max() < output_bf16.pred_score[3:].min()
    map_error = (output_bf16.anomaly_map - output.anomaly_map).abs().amax(dim=(1, 2, 3))
    assert torch.all(map_error <= MAP_RTOL * output.anomaly_map.amax(dim=(1, 2, 3)))


@pytest.mark.parametrize(("accelerates", "warnings_expected"), [(False, 1), (True, 0), (None, 0)])
def test_bf16_on_a_cpu_without_bf16_instructions_warns_once(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    accelerates: bool | None,
    warnings_expected: int,
) -> None:
    """``bf16-mixed`` on a CPU without bf16 instructions warns once per process; elsewhere it stays silent."""
    monkeypatch.setattr(lightning_model, "cpu_accelerates_bf16", lambda: accelerates)
    precision.warn_slow_cpu_bf16.cache_clear()
    model = GCAFlow(backbone=LITE0, pre_trained=False, image_size=[64, 64], depths=[1, 1, 1])
    for trainer_precision in ("bf16-mixed", "bf16-mixed", "32-true"):
        model.trainer = Trainer(accelerator="cpu", devices=1, precision=trainer_precision, logger=False)
        with caplog.at_level(logging.WARNING, logger=precision.__name__):
            model.on_fit_start()
    slow = [record for record in caplog.records if "without bf16 instructions" in record.getMessage()]
    assert len(slow) == warnings_expected


@pytest.mark.parametrize(("trainer_precision", "fused"), [("32-true", True), ("bf16-mixed", None)])
def test_adam_is_fused_except_where_lightning_clips_mixed_precision_gradients(
    trainer_precision: str, fused: bool | None
) -> None:
    """Fused Adam in full precision, torch's default under Lightning's mixed-precision plugin.

    That plugin cannot clip a fused optimizer's gradients; a bf16 step with GCAFlow's clipping must run.
    """
    model = GCAFlow(backbone=LITE0, pre_trained=False, image_size=[64, 64], depths=[1, 1, 1], pos_embed_dim=8)
    trainer = Trainer(accelerator="cpu", devices=1, precision=trainer_precision, logger=False)
    model.trainer = trainer
    [optimizer], _ = model.configure_optimizers()
    assert optimizer.param_groups[0]["fused"] is fused
    features = [torch.randn(2, c, 4, 4) for c in model.model.feature_extractor.channels]
    with trainer.precision_plugin.forward_context():
        loss = model.loss(*model.model.flow(features))
    loss.backward()
    model.configure_gradient_clipping(optimizer)
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.model.flow.parameters())


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    """x86 and Arm flag lines are recognised; an unreadable file means unknown, not absent."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert precision.cpu_accelerates_bf16(cpuinfo) is True
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert precision.cpu_accelerates_bf16(cpuinfo) is False
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert precision.cpu_accelerates_bf16(cpuinfo) is True
    assert precision.cpu_accelerates_bf16(tmp_path / "missing") is None


def test_pinned_ir_computes_in_fp32_whatever_hint_the_application_passes(tmp_path: Path) -> None:
    """An IR pinned by ``pin_openvino_fp32`` gives fp32 results with no hint and even with a bf16 hint.

    On AVX2-only CPUs every compilation is fp32 anyway; on AVX512_BF16 and AMX CPUs the unpinned IR compiled
    without a hint runs in bf16, which is what the pin prevents.
    """
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.GELU(), torch.nn.Conv2d(64, 8, 3)).eval()
    inputs = torch.randn(2, 3, 16, 16)
    xml_path = tmp_path / "model.xml"
    openvino.save_model(openvino.convert_model(network, example_input=inputs), xml_path, compress_to_fp16=False)
    core = openvino.Core()
    fp32 = core.compile_model(str(xml_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(inputs.numpy())[0]
    if core.get_property("CPU", "INFERENCE_PRECISION_HINT") != openvino.Type.f32:
        # This CPU defaults to reduced precision: the unpinned IR must show the difference the pin removes.
        unpinned = core.compile_model(str(xml_path), "CPU")(inputs.numpy())[0]
        assert np.abs(unpinned - fp32).max() > 1e-4
    pin_openvino_fp32(xml_path)
    for config in ({}, {"INFERENCE_PRECISION_HINT": "bf16"}):
        pinned = core.compile_model(str(xml_path), "CPU", config)(inputs.numpy())[0]
        np.testing.assert_allclose(pinned, fp32, rtol=0, atol=1e-6, err_msg=f"pinned IR compiled with {config}")


@pytest.mark.parametrize("bad", ["bf16", "fp32", "F32", ""])
def test_unknown_openvino_inference_precision_is_rejected(bad: str, tmp_path: Path) -> None:
    """A bad ``inference_precision`` fails before any export work, naming the option and the allowed values."""
    with pytest.raises(ValueError, match=r"inference_precision must be one of 'f32', 'auto', got"):
        check_inference_precision(bad)
    model = GCAFlow(backbone=LITE0, pre_trained=False, image_size=[64, 64], depths=[1, 1, 1])
    with pytest.raises(ValueError, match="inference_precision"):
        model.to_openvino(tmp_path, inference_precision=bad)
    assert not any(tmp_path.iterdir())
