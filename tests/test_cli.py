"""The ``anomalib`` command with GCAFlow, as a user types it, on the real MVTec AD bottle images.

Every test runs this environment's ``anomalib`` executable in a subprocess, offline, with the quick-start config
shrunk to test size (1 epoch, 128 px, one flow block per scale). The bare names ``--model GCAFlow`` and
``--data MVTec`` need the project INSTALLED (``pip install -e .``): its start-up hook registers them.
"""

import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml
from PIL import Image
from repo_paths import REPO_ROOT

if TYPE_CHECKING:
    import torch

pytestmark = pytest.mark.slow

ANOMALIB = Path(sys.executable).with_name("anomalib")
QUICKSTART = REPO_ROOT / "configs" / "quickstart_cpu.yaml"
TIMEOUT = 1200
# Shared by every command that builds the model: a checkpoint only loads into the architecture it was saved from.
MODEL_SIZE = ["--model.image_size", "[128, 128]", "--model.depths", "[1, 1, 1]"]
TRAIN_SIZE = ["--trainer.max_epochs", "1", *MODEL_SIZE, "--data.num_workers", "0"]
METRIC = re.compile(r"\b(image_AUROC|pixel_AUROC)[\s│┃|]+([0-9][0-9.]*(?:[eE][-+]?\d+)?)")
# what jsonargparse says when the bare --model GCAFlow / --data MVTec are unknown
PLUGIN_MISSING = ("Expected a dot import path string", "MVTec either not accessible or invalid")


def _anomalib(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``anomalib *args`` offline in ``cwd``; fail with its output unless it exits 0."""
    if not ANOMALIB.is_file():
        pytest.fail(f"no `anomalib` executable next to {sys.executable}: install the project (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if k != "ANOMALIB_GCAFLOW_DISABLE_PLUGIN"}
    # wide enough that rich prints metric names in full
    env.update(HF_HUB_OFFLINE="1", COLUMNS="200")
    proc = subprocess.run(
        [str(ANOMALIB), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        hint = ""
        if any(message in proc.stderr for message in PLUGIN_MISSING):
            hint = (
                "\nThe bare names GCAFlow / MVTec did not resolve: the project's start-up hook is not installed in "
                "this environment. Install the project (`pip install -e .`, see docs/plugin.md) and rerun.\n"
            )
        pytest.fail(
            f"`anomalib {' '.join(args)}` exited {proc.returncode}{hint}\n"
            f"--- stdout (tail)\n{proc.stdout[-4000:]}\n--- stderr (tail)\n{proc.stderr[-4000:]}",
        )
    return proc


def _metrics(stdout: str) -> dict[str, float]:
    """Image and pixel AUROC from the test-metric table; both must be there and be valid AUROCs."""
    metrics = {name: float(value) for name, value in METRIC.findall(stdout)}
    assert set(metrics) == {"image_AUROC", "pixel_AUROC"}, f"no AUROC table in the output:\n{stdout[-3000:]}"
    for name, value in metrics.items():
        assert math.isfinite(value), (name, value)
        assert 0.0 <= value <= 1.0, (name, value)
    return metrics


def _count_images(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})


def _checkpoint_state(path: Path) -> tuple[int, int]:
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return checkpoint["epoch"], checkpoint["global_step"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, mvtec_root: Path) -> tuple[Path, dict[str, float]]:
    """``anomalib train --model GCAFlow --data MVTec ...`` (bare names): its checkpoint and test metrics."""
    out = tmp_path_factory.mktemp("train_bare_names")
    proc = _anomalib(
        "train",
        "--config",
        str(QUICKSTART),
        "--model",
        "GCAFlow",
        "--data",
        "MVTec",
        "--data.root",
        str(mvtec_root),
        "--data.category",
        "bottle",
        *TRAIN_SIZE,
        "--default_root_dir",
        str(out),
        cwd=out,
    )
    return out, _metrics(proc.stdout)


@pytest.fixture(scope="session")
def checkpoint(trained: tuple[Path, dict[str, float]]) -> Path:
    out, _ = trained
    path = out / "GCAFlow" / "MVTecAD" / "bottle" / "latest" / "weights" / "lightning" / "model.ckpt"
    assert path.is_file(), f"anomalib's default checkpoint is missing: {path}"
    return path


def _callback_args(directory: Path) -> list[str]:
    """The ModelCheckpoint of anomalib (keeps last.ckpt) and Lightning's (keeps the best pixel AUROC)."""
    return [
        "--trainer.callbacks+=anomalib.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath",
        str(directory / "last"),
        "--trainer.callbacks.save_last",
        "true",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath",
        str(directory / "best"),
        "--trainer.callbacks.monitor",
        "pixel_AUROC",
        "--trainer.callbacks.mode",
        "max",
    ]


def _dotted_command(subcommand: str, mvtec_root: Path, out: Path) -> list[str]:
    return [
        subcommand,
        "--config",
        str(QUICKSTART),
        "--model",
        "anomalib_gcaflow.GCAFlow",
        "--data",
        "MVTecAD",
        "--data.root",
        str(mvtec_root),
        "--data.category",
        "bottle",
        *TRAIN_SIZE,
        "--default_root_dir",
        str(out),
        *_callback_args(out),
    ]


@pytest.fixture(scope="session")
def trained_with_callbacks(tmp_path_factory: pytest.TempPathFactory, mvtec_root: Path) -> tuple[Path, str]:
    """``anomalib train --model anomalib_gcaflow.GCAFlow --data MVTecAD ...`` with two ModelCheckpoint callbacks."""
    out = tmp_path_factory.mktemp("train_dotted_names")
    proc = _anomalib(*_dotted_command("train", mvtec_root, out), cwd=out)
    return out, proc.stdout


def test_train_with_bare_names_writes_metrics_checkpoint_and_heat_maps(
    trained: tuple[Path, dict[str, float]],
    checkpoint: Path,
    mvtec_root: Path,
) -> None:
    out, _ = trained  # the fixture already checked the exit status and both AUROCs
    assert checkpoint.stat().st_size > 0
    images = out / "GCAFlow" / "MVTecAD" / "bottle" / "latest" / "images"
    # one overlay per test image, named after it, in its defect-type folder
    assert _count_images(images) == _count_images(mvtec_root / "bottle" / "test")
    overlay = next(images.rglob("*.png"))
    with Image.open(overlay) as image:
        assert min(image.size) >= 128


def test_train_with_dotted_model_and_mvtecad_and_checkpoint_callbacks(
    trained_with_callbacks: tuple[Path, str],
) -> None:
    out, stdout = trained_with_callbacks
    _metrics(stdout)
    assert (out / "last" / "last.ckpt").is_file(), "anomalib's ModelCheckpoint(save_last=True) wrote no last.ckpt"
    assert list((out / "best").glob("*.ckpt")), "Lightning's ModelCheckpoint wrote nothing"
    assert (out / "GCAFlow" / "MVTecAD" / "bottle" / "latest" / "images").is_dir()


def test_fit_with_ckpt_path_resumes_training(trained_with_callbacks: tuple[Path, str], mvtec_root: Path) -> None:
    out, _ = trained_with_callbacks
    last = out / "last" / "last.ckpt"
    epoch, steps_per_epoch = _checkpoint_state(last)
    assert epoch == 0
    assert steps_per_epoch > 0
    command = _dotted_command("fit", mvtec_root, out)
    command[command.index("--trainer.max_epochs") + 1] = "2"
    proc = _anomalib(*command, "--ckpt_path", str(last), cwd=out)
    assert "Restored all states from the checkpoint" in proc.stdout + proc.stderr
    # exactly one more epoch: the optimiser, scheduler and loop state came from the checkpoint
    assert _checkpoint_state(last) == (1, 2 * steps_per_epoch)


def test_test_with_checkpoint_reproduces_the_training_run_metrics(
    trained: tuple[Path, dict[str, float]],
    checkpoint: Path,
    mvtec_root: Path,
    tmp_path: Path,
) -> None:
    _, train_metrics = trained
    proc = _anomalib(
        "test",
        "--config",
        str(QUICKSTART),
        "--model",
        "GCAFlow",
        "--data",
        "MVTec",
        "--data.root",
        str(mvtec_root),
        "--data.category",
        "bottle",
        *MODEL_SIZE,
        "--data.num_workers",
        "0",
        "--ckpt_path",
        str(checkpoint),
        "--default_root_dir",
        str(tmp_path),
        cwd=tmp_path,
    )
    # weights AND the post-processor's thresholds/normalisation statistics came back from the checkpoint
    assert _metrics(proc.stdout) == pytest.approx(train_metrics, abs=1e-6)


def test_predict_with_checkpoint_on_a_folder_of_images(checkpoint: Path, mvtec_root: Path, tmp_path: Path) -> None:
    folder = mvtec_root / "bottle" / "test" / "broken_large"
    _anomalib(
        "predict",
        "--config",
        str(QUICKSTART),
        "--model",
        "GCAFlow",
        *MODEL_SIZE,
        "--data",
        str(folder),
        "--ckpt_path",
        str(checkpoint),
        "--default_root_dir",
        str(tmp_path),
        cwd=tmp_path,
    )
    written = sorted((tmp_path / "GCAFlow").rglob("*.png"))
    assert sorted(p.name for p in written) == sorted(p.name for p in folder.glob("*.png"))


def test_export_torch_gives_a_model_that_predicts(checkpoint: Path, mvtec_root: Path, tmp_path: Path) -> None:
    _anomalib(
        "export",
        "--config",
        str(QUICKSTART),
        "--model",
        "GCAFlow",
        *MODEL_SIZE,
        "--export_type",
        "torch",
        "--ckpt_path",
        str(checkpoint),
        "--default_root_dir",
        str(tmp_path),
        cwd=tmp_path,
    )
    exported = tmp_path / "weights" / "torch" / "model.pt"
    assert exported.is_file()

    os.environ.setdefault("TRUST_REMOTE_CODE", "1")  # anomalib's TorchInferencer unpickles the whole model
    from anomalib.deploy import TorchInferencer

    image = next((mvtec_root / "bottle" / "test" / "broken_large").glob("*.png"))
    prediction = TorchInferencer(path=exported, device="cpu").predict(image)
    assert prediction.anomaly_map.shape[-2:] == (128, 128)
    assert 0.0 <= prediction.pred_score.item() <= 1.0


def test_benchmark_with_gcaflow_in_the_model_grid(mvtec_root: Path, tmp_path: Path) -> None:
    config = {
        "accelerator": "cpu",
        "benchmark": {
            "seed": 42,
            "model": {
                "class_path": {"grid": ["GCAFlow"]},
                # the benchmark passes no trainer options: the model's own max_epochs bounds training
                "init_args": {
                    "backbone": "tf_efficientnet_lite0",
                    "image_size": [128, 128],
                    "depths": [1, 1, 1],
                    "lr": 1e-3,
                    "warmup_epochs": 0,
                    "max_epochs": 1,
                },
            },
            "data": {
                "class_path": "MVTecAD",
                "init_args": {"root": str(mvtec_root), "category": "bottle", "num_workers": 0},
            },
        },
    }
    (tmp_path / "benchmark.yaml").write_text(yaml.safe_dump(config))
    _anomalib("benchmark", "--config", "benchmark.yaml", cwd=tmp_path)
    # `anomalib benchmark` exits 0 even when every job failed: the results table is the evidence
    tables = list((tmp_path / "runs" / "benchmark").glob("*/results.csv"))
    assert len(tables) == 1, f"no results table; see {tmp_path / 'runs' / 'pipeline.log'}"
    with tables[0].open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1
    assert rows[0]["model.class_path"] == "GCAFlow"
    for name in ("image_AUROC", "pixel_AUROC"):
        assert 0.0 <= float(rows[0][name]) <= 1.0, (name, rows[0][name])


def test_first_offline_run_without_backbone_weights_says_how_to_fix_it_first_and_last(
    mvtec_root: Path,
    tmp_path: Path,
) -> None:
    """The design card's bare command, offline and with an empty Hugging Face cache, fails with the fix in view.

    The first error line and the last line of the output name the cause and both fixes (``weights_path`` or an
    offline backbone); jsonargparse's "Union subtypes" report and its dump of every init argument do not appear.
    """
    env = {k: v for k, v in os.environ.items() if k != "ANOMALIB_GCAFLOW_DISABLE_PLUGIN"}
    # One unbuffered stream, in the order a terminal shows it.
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty_hf_home"), COLUMNS="200", PYTHONUNBUFFERED="1")
    command = [str(ANOMALIB), "train", "--model", "GCAFlow", "--data", "MVTec"]
    command += ["--data.root", str(mvtec_root), "--data.category", "bottle"]
    result = subprocess.run(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=TIMEOUT,
        check=False,
    )
    output = result.stdout
    assert result.returncode != 0, output[-3000:]
    assert "Union subtypes" not in output
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    first_error = next(line for line in lines if "ERROR" in line)
    assert "'wide_resnet50_2'" in first_error, first_error
    assert "weights_path" in first_error and "tf_efficientnet_lite0" in first_error, first_error
    last = lines[-1]
    assert "tf_efficientnet_lite0" in last or "quickstart_cpu.yaml" in last, last


def _flow_weights(root: Path) -> dict[str, "torch.Tensor"]:
    """The flow's weights in the one checkpoint anomalib saved under ``root``."""
    import torch

    (path,) = root.rglob("model.ckpt")
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {name: value for name, value in state.items() if name.startswith("model.flow.")}


def test_train_with_the_configured_seed_is_reproducible(tiny_folder: Path, tmp_path: Path) -> None:
    """Two ``anomalib train`` runs of the quick-start config (its seed, 2 data-loader workers, shuffled batches).

    Only the data set (the tiny real bottle folder) and the model size differ from the quick start. anomalib 2.7's
    CLI ignores ``seed_everything`` by itself; without the start-up hook's seeding the two runs start from
    different weights.
    """
    import torch

    config = yaml.safe_load(QUICKSTART.read_text())
    config["data"] = {
        "class_path": "anomalib.data.Folder",
        "init_args": {
            "name": "tiny",
            "root": str(tiny_folder),
            "normal_dir": "good",
            "normal_test_dir": "good_test",
            "abnormal_dir": "bad",
            "mask_dir": "mask",
            "train_batch_size": 2,
            "eval_batch_size": 4,
            "num_workers": 2,
            "val_split_mode": "same_as_test",
        },
    }
    config_path = tmp_path / "quickstart_tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    runs = []
    for name in ("first", "second"):
        out = tmp_path / name
        out.mkdir()
        proc = _anomalib(
            "train",
            "--config",
            str(config_path),
            "--trainer.max_epochs",
            "1",
            "--model.max_epochs",
            "1",
            "--model.image_size",
            "[64, 64]",
            "--model.depths",
            "[1, 1, 1]",
            "--default_root_dir",
            str(out),
            cwd=out,
        )
        runs.append((_metrics(proc.stdout), _flow_weights(out)))
    (first_metrics, first_weights), (second_metrics, second_weights) = runs
    for name, value in first_metrics.items():
        assert abs(value - second_metrics[name]) <= 1e-6, (name, first_metrics, second_metrics)
    assert first_weights.keys() == second_weights.keys()
    assert first_weights
    for name, value in first_weights.items():
        assert torch.equal(value, second_weights[name]), name
    saved = yaml.safe_load(next((tmp_path / "first").rglob("config.yaml")).read_text())
    assert saved["seed_everything"] == config["seed_everything"]
