"""``anomalib predict`` on a plain folder of real images, and what a corrupt image in that folder does.

anomalib 2.7 accepts a folder path as ``--data`` for ``predict`` (it wraps it in a ``PredictDataset``); the
visualiser then writes one result image per input under ``<default_root_dir>/GCAFlow/latest/images/<folder>/``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from PIL import Image
from repo_paths import REPO_ROOT

from anomalib_gcaflow import GCAFlow

MODEL_ARGS = {
    "backbone": "tf_efficientnet_lite0",
    "image_size": [128, 128],
    "depths": [1, 1, 1],
    "lr": 1e-3,
    "warmup_epochs": 0,
    "max_epochs": 1,
}
REAL_IMAGES = ("good/000.png", "broken_large/000.png", "contamination/000.png")
CLI_TIMEOUT_S = 600


def _engine(root: Path, **trainer_args: object) -> Engine:
    return Engine(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        **trainer_args,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, mvtec_root: Path) -> tuple[GCAFlow, Path]:
    """A GCAFlow trained for two batches (predictions need not be good here) and its checkpoint."""
    seed_everything(0)
    model = GCAFlow(**MODEL_ARGS)
    datamodule = MVTecAD(root=mvtec_root, category="bottle", train_batch_size=8, eval_batch_size=16, num_workers=0)
    engine = _engine(tmp_path_factory.mktemp("train"), max_epochs=1, limit_train_batches=2, limit_val_batches=2)
    engine.fit(model, datamodule=datamodule)
    return model, Path(engine.best_model_path)


def _image_folder(root: Path, mvtec_root: Path) -> Path:
    """A folder of real bottle test images named after their defect type."""
    root.mkdir()
    for relative in REAL_IMAGES:
        shutil.copyfile(mvtec_root / "bottle" / "test" / relative, root / relative.replace("/", "_"))
    return root


@pytest.mark.slow
def test_cli_predict_on_a_folder_writes_one_result_per_image(
    trained: tuple[GCAFlow, Path],
    mvtec_root: Path,
    tmp_path: Path,
) -> None:
    """``anomalib predict --data <folder>`` writes one readable result image for each input image."""
    _, checkpoint = trained
    inputs = _image_folder(tmp_path / "to_inspect", mvtec_root)
    output_root = tmp_path / "results"
    command = [
        str(Path(sys.executable).with_name("anomalib")),
        "predict",
        "--model",
        "anomalib_gcaflow.GCAFlow",
        # predict builds the model from these arguments and then loads the checkpoint's weights into it, so the
        # architecture arguments must be the ones the checkpoint was trained with.
        *[f"--model.{name}={value}" for name, value in MODEL_ARGS.items()],
        "--ckpt_path",
        str(checkpoint),
        "--data",
        str(inputs),
        "--default_root_dir",
        str(output_root),
    ]
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": python_path}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=CLI_TIMEOUT_S, check=False)
    assert result.returncode == 0, f"anomalib predict failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"

    written = sorted(output_root.glob("GCAFlow/latest/images/**/*.png"))
    assert sorted(path.name for path in written) == sorted(path.name for path in inputs.iterdir())
    for path in written:
        with Image.open(path) as image:
            image.load()
            # The visualiser puts the image, its anomaly map overlay and its predicted mask side by side.
            assert image.width > image.height


def _corrupt_folder(root: Path, mvtec_root: Path, corrupt_name: str, corrupt_bytes: bytes) -> Path:
    folder = _image_folder(root, mvtec_root)
    (folder / corrupt_name).write_bytes(corrupt_bytes)
    return folder


def test_a_file_that_is_not_an_image_stops_predict_with_its_name(
    trained: tuple[GCAFlow, Path],
    mvtec_root: Path,
    tmp_path: Path,
) -> None:
    """A file with an image suffix but other contents stops the run with an error naming that file."""
    model, _ = trained
    folder = _corrupt_folder(tmp_path / "inputs", mvtec_root, "notes.png", b"not an image at all\n")
    with pytest.raises(ValueError, match="cannot be read") as error_info:
        _engine(tmp_path / "results").predict(model=model, data_path=folder)
    assert str(folder / "notes.png") in str(error_info.value)


def test_a_truncated_image_stops_predict_with_its_name(
    trained: tuple[GCAFlow, Path],
    mvtec_root: Path,
    tmp_path: Path,
) -> None:
    """A truncated image (an interrupted copy) stops the run with an error naming that file."""
    model, _ = trained
    start_of_png = (mvtec_root / "bottle" / "test" / "good" / "001.png").read_bytes()[:2000]
    folder = _corrupt_folder(tmp_path / "inputs", mvtec_root, "interrupted_copy.png", start_of_png)
    with pytest.raises(ValueError, match="cannot be read") as error_info:
        _engine(tmp_path / "results").predict(model=model, data_path=folder)
    assert str(folder / "interrupted_copy.png") in str(error_info.value)
