"""Exported GCAFlow (ONNX, OpenVINO) scores real images exactly as the torch model does.

One small GCAFlow (EfficientNet-Lite0, 128 x 128, one H-Flow block per scale) is trained for two epochs on the real
MVTec AD bottle images, so that its scores and maps are spread out and its post-processor holds real thresholds.
It is exported with a real ``anomalib export --export_type onnx`` run on its checkpoint (``Engine.export``,
which calls ``model.to_onnx``; dynamic height and width, as without ``--input_size``). onnxruntime runs that file,
and a second run, ``anomalib export --export_type openvino``, writes the IR that ``openvino.Core`` and anomalib's
``OpenVINOInferencer`` run with the fp32 inference-precision hint, so that the same scores come out on AVX2,
AVX-512, AVX512_BF16 and AMX CPUs (without it OpenVINO computes in bf16 on the last two). All take the raw
``[0, 1]`` RGB batch and contain the pre- and post-processing, so they are compared with the whole torch pipeline,
``model(images)``, on six real test images (three good, three defective).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import openvino
import pytest
import torch
from anomalib.data import InferenceBatch, MVTecAD
from anomalib.deploy import OpenVINOInferencer
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from repo_paths import REPO_ROOT
from torchvision.io import read_image

from anomalib_gcaflow import GCAFlow
from anomalib_gcaflow.model.flow.positional_conv import PositionalConv2d

IMAGE_SIZE = (128, 128)
MODEL_ARGS = {
    "backbone": "tf_efficientnet_lite0",
    "image_size": list(IMAGE_SIZE),
    "depths": [1, 1, 1],
    "lr": 1e-3,
    "warmup_epochs": 0,
    "max_epochs": 2,
}
# Absolute tolerance on the normalised score and map (both in [0, 1]); no relative tolerance is needed.
ATOL = 1e-4
TEST_IMAGES = {"good": 3, "broken_large": 1, "broken_small": 1, "contamination": 1}
CLI_TIMEOUT_S = 600

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, mvtec_root: Path) -> tuple[GCAFlow, Path]:
    """A briefly trained GCAFlow in eval mode and its Lightning checkpoint."""
    seed_everything(0)
    model = GCAFlow(**MODEL_ARGS)
    datamodule = MVTecAD(root=mvtec_root, category="bottle", train_batch_size=8, eval_batch_size=16, num_workers=0)
    engine = Engine(
        default_root_dir=tmp_path_factory.mktemp("train"),
        max_epochs=2,
        check_val_every_n_epoch=2,  # one validation, after training: it sets the post-processor's thresholds
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
    )
    engine.fit(model, datamodule=datamodule)
    return model.eval(), Path(engine.best_model_path)


@pytest.fixture(scope="module")
def images(mvtec_root: Path) -> torch.Tensor:
    """Real bottle test images as the exported graph takes them: a raw ``[0, 1]`` RGB batch at 512 x 512."""
    files = [
        path
        for defect, count in TEST_IMAGES.items()
        for path in sorted((mvtec_root / "bottle" / "test" / defect).glob("*.png"))[:count]
    ]
    return torch.stack([read_image(str(path)).float() / 255 for path in files])


@pytest.fixture(scope="module")
def reference(trained: tuple[GCAFlow, Path], images: torch.Tensor) -> InferenceBatch:
    """The torch pipeline's output (pre-processing, model, post-processing), checked to be informative."""
    model, _ = trained
    with torch.no_grad():
        output = model(images)
    # Equality of scores that are all clamped to 0 or 1 would prove nothing.
    interior = ((output.pred_score > 0.01) & (output.pred_score < 0.99)).sum().item()
    assert interior >= 2, f"degenerate reference scores {output.pred_score.tolist()}: train the model longer"
    assert output.anomaly_map.std() > 0.05, "degenerate reference anomaly maps"
    # The rank-preserving post-processor never ties two images, however far they lie from the threshold.
    assert len(torch.unique(output.pred_score)) == len(output.pred_score), output.pred_score.tolist()
    return output


def _cli_export(checkpoint: Path, export_type: str, export_root: Path) -> None:
    """Run ``anomalib export`` on the checkpoint as a user would."""
    command = [
        str(Path(sys.executable).with_name("anomalib")),
        "export",
        "--model",
        "anomalib_gcaflow.GCAFlow",
        # The CLI builds the model from these arguments before loading the checkpoint's own; an offline backbone
        # keeps that first build from trying to download WideResNet-50 weights.
        "--model.backbone",
        "tf_efficientnet_lite0",
        "--export_type",
        export_type,
        "--ckpt_path",
        str(checkpoint),
        "--export_root",
        str(export_root),
    ]
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": python_path}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=CLI_TIMEOUT_S, check=False)
    assert result.returncode == 0, f"anomalib export failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


@pytest.fixture(scope="module")
def cli_onnx(trained: tuple[GCAFlow, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ONNX file written by a real ``anomalib export --export_type onnx`` run on the checkpoint."""
    export_root = tmp_path_factory.mktemp("cli_onnx")
    _cli_export(trained[1], "onnx", export_root)
    onnx_path = export_root / "weights" / "onnx" / "model.onnx"
    assert onnx_path.is_file(), f"no ONNX file at {onnx_path}; export root holds {sorted(export_root.rglob('*'))}"
    return onnx_path


@pytest.fixture(scope="module")
def cli_openvino(trained: tuple[GCAFlow, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The IR written by a real ``anomalib export --export_type openvino`` run (GCAFlow's fp32-pinned export)."""
    export_root = tmp_path_factory.mktemp("cli_openvino")
    _cli_export(trained[1], "openvino", export_root)
    xml_path = export_root / "weights" / "openvino" / "model.xml"
    assert xml_path.is_file(), f"no IR at {xml_path}; export root holds {sorted(export_root.rglob('*'))}"
    return xml_path


def _assert_matches(outputs: dict[str, np.ndarray], reference: InferenceBatch, runtime: str) -> None:
    """Compare an exported model's outputs with the torch pipeline's."""
    for name in ("pred_score", "anomaly_map"):
        expected = getattr(reference, name).numpy()
        assert outputs[name].shape == expected.shape, f"{runtime} {name} shape"
        error = np.abs(outputs[name].astype(np.float64) - expected).max()
        assert error <= ATOL, f"{runtime} {name} differs from torch by {error:.2e} > {ATOL}"
    np.testing.assert_array_equal(outputs["pred_label"], reference.pred_label.numpy(), err_msg=f"{runtime} pred_label")
    scores = outputs["pred_score"].reshape(-1)
    assert len(np.unique(scores)) == scores.size, f"{runtime} ties image scores: {scores.tolist()}"
    np.testing.assert_array_equal(scores.argsort(), reference.pred_score.numpy().argsort(), err_msg=f"{runtime} order")
    # A mask pixel may flip only where the map sits within the tolerance of the 0.5 threshold.
    flipped = outputs["pred_mask"] != reference.pred_mask.numpy()
    assert np.all(np.abs(reference.anomaly_map.numpy()[flipped] - 0.5) <= ATOL), f"{runtime} pred_mask"


def test_cli_onnx_export_matches_torch_on_real_images(
    cli_onnx: Path,
    images: torch.Tensor,
    reference: InferenceBatch,
) -> None:
    """``anomalib export --export_type onnx`` gives a graph whose onnxruntime outputs equal torch's to 1e-4."""
    session = onnxruntime.InferenceSession(str(cli_onnx), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    assert set(names) == {"pred_score", "pred_label", "anomaly_map", "pred_mask"}
    outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()}), strict=True))
    _assert_matches(outputs, reference, "onnxruntime")


@pytest.mark.parametrize("scoring", ["likelihood", "standardized", "bounded"])
def test_onnx_export_of_the_likelihood_scorings_matches_torch(
    trained: tuple[GCAFlow, Path],
    images: torch.Tensor,
    tmp_path: Path,
    scoring: str,
) -> None:
    """The absolute-likelihood scores and maps (plain, standardised, bounded per scale) export like the paper's."""
    model = copy.deepcopy(trained[0])
    assert int(model.model.anomaly_map_generator.num_batches_tracked) > 0
    model.model.anomaly_map_generator.image_score = scoring
    model.model.anomaly_map_generator.pixel_map = scoring
    with torch.no_grad():
        reference = model(images)
    path = model.to_onnx(tmp_path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()}), strict=True))
    _assert_matches(outputs, reference, f"onnxruntime ({scoring} scoring)")


# Scores of the pinned IR compiled without an inference-precision hint: identical to fp32 where the CPU has no bf16
# instructions; on AVX512_BF16 and AMX CPUs OpenVINO 2026.4 still runs the operations its own transformations create
# (fused RMS, Interpolate, Softmax, ...) in bf16. Measured on an AVX512_BF16 EPYC: 7.4e-4 on these six images
# (6.4e-3 at most over all 83 bottle test images), against 1.0e-2 for the unpinned IR.
UNHINTED_ATOL = 5e-3
F32_HINT = {"INFERENCE_PRECISION_HINT": "f32"}


def test_openvino_export_matches_torch_on_real_images(
    cli_openvino: Path,
    images: torch.Tensor,
    reference: InferenceBatch,
) -> None:
    """``anomalib export --export_type openvino`` gives an IR whose fp32 CPU compilation equals torch to 1e-4."""
    compiled = openvino.Core().compile_model(str(cli_openvino), "CPU", F32_HINT)
    results = compiled(images.numpy())
    outputs = {output.get_any_name(): results[output] for output in compiled.outputs}
    _assert_matches(outputs, reference, "OpenVINO")


def test_openvino_export_without_a_hint_stays_near_torch_on_real_images(
    cli_openvino: Path,
    images: torch.Tensor,
    reference: InferenceBatch,
) -> None:
    """Compiled with no hint, as most deployments do, the pinned IR's scores stay within ``UNHINTED_ATOL``."""
    compiled = openvino.Core().compile_model(str(cli_openvino), "CPU")
    results = compiled(images.numpy())
    scores = next(results[output] for output in compiled.outputs if output.get_any_name() == "pred_score")
    assert np.abs(scores.astype(np.float64) - reference.pred_score.numpy()).max() <= UNHINTED_ATOL


def test_openvino_inferencer_matches_torch_on_real_images(
    cli_openvino: Path,
    images: torch.Tensor,
    reference: InferenceBatch,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ``OpenVINOInferencer`` of anomalib with the fp32 hint (device ``AUTO``) equals torch to 1e-4."""
    monkeypatch.chdir(tmp_path)  # the inferencer writes an openvino_cache folder into the working directory
    prediction = OpenVINOInferencer(path=cli_openvino, config=F32_HINT).predict(images)
    # The inferencer's batch drops the mask's channel axis; the values are the IR's.
    outputs = {
        name: getattr(prediction, name).reshape(getattr(reference, name).shape)
        for name in ("pred_score", "pred_label", "anomaly_map", "pred_mask")
    }
    _assert_matches(outputs, reference, "OpenVINOInferencer")


def _positional_concats(onnx_path: Path, pos_channels: int) -> list[str]:
    """Name every Concat that stacks a ``pos_channels``-channel tensor onto a batch of feature maps."""
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path))).graph
    shapes = {
        info.name: [dim.dim_param or dim.dim_value for dim in info.type.tensor_type.shape.dim]
        for info in [*graph.value_info, *graph.input, *graph.output]
    }
    shapes |= {init.name: list(init.dims) for init in graph.initializer}
    found = []
    for node in graph.node:
        axis = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), None)
        input_shapes = [shapes.get(name, []) for name in node.input]
        if (
            node.op_type == "Concat"
            and axis in (1, -3)
            and any(len(shape) == 4 and shape[1] == pos_channels for shape in input_shapes)
        ):
            found.append(f"{node.name}: {input_shapes}")
    return found


def test_exported_graph_keeps_the_positional_folding(cli_onnx: Path, tmp_path: Path) -> None:
    """The export computes the positional encoding's response once, never concatenating it to the images.

    The detector is first shown to find the concatenation in a graph that has it (the unfolded convolution).
    """
    unfolded = PositionalConv2d(8, 8, 3, pos_channels=64, fold_positional=False).eval()
    unfolded_path = tmp_path / "unfolded.onnx"
    torch.onnx.export(
        unfolded,
        (torch.rand(2, 8, 6, 6),),
        str(unfolded_path),
        dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    assert _positional_concats(unfolded_path, 64), "the check does not see an unfolded positional concatenation"
    assert _positional_concats(cli_onnx, 64) == []
