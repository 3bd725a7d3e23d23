"""Nothing lost: an exception or Ctrl-C mid-training leaves the last finished epoch's checkpoint.

Resuming from it ends with the weights, optimiser state and test metrics of an uninterrupted run.

Also home of the small real-data fixtures that the other reliability tests import.
"""

import signal
from pathlib import Path

import pytest
import torch
from anomalib.data import Folder
from anomalib.engine import Engine
from lightning.pytorch import Callback, Trainer, seed_everything
from PIL import Image

from anomalib_gcaflow import GCAFlow
from anomalib_gcaflow.callbacks import LastEpochCheckpoint

LITE0 = "tf_efficientnet_lite0"
EPOCHS = 3


def make_tiny_folder(mvtec_root: Path, destination: Path, size: int = 64, train: int = 8) -> Path:
    """Write a small Folder data set of real, downscaled bottle images.

    ``good/`` holds ``train`` normal training images, ``good_test/`` 4 normal test images, ``bad/`` 3 anomalous
    ones (broken_large) with their masks in ``mask/``: 7 test images, an odd number.
    """
    bottle = mvtec_root / "bottle"
    parts = [
        (bottle / "train" / "good", "good", train, Image.Resampling.BILINEAR),
        (bottle / "test" / "good", "good_test", 4, Image.Resampling.BILINEAR),
        (bottle / "test" / "broken_large", "bad", 3, Image.Resampling.BILINEAR),
        (bottle / "ground_truth" / "broken_large", "mask", 3, Image.Resampling.NEAREST),
    ]
    for source_dir, name, count, resample in parts:
        (destination / name).mkdir(parents=True, exist_ok=True)
        for source in sorted(source_dir.glob("*.png"))[:count]:
            with Image.open(source) as image:
                image.resize((size, size), resample).save(destination / name / source.name)
    return destination


@pytest.fixture(scope="session")
def tiny_folder(mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small Folder data set (64 px), built once per session."""
    return make_tiny_folder(mvtec_root, tmp_path_factory.mktemp("tiny_folder"))


def tiny_datamodule(root: Path, train_batch_size: int = 4, eval_batch_size: int = 4) -> Folder:
    """Folder data module over :func:`make_tiny_folder`'s layout; validation = test (7 images)."""
    return Folder(
        name="tiny",
        root=root,
        normal_dir="good",
        normal_test_dir="good_test",
        abnormal_dir="bad",
        mask_dir="mask",
        train_batch_size=train_batch_size,
        eval_batch_size=eval_batch_size,
        num_workers=0,
        val_split_mode="same_as_test",
    )


def tiny_gcaflow(**overrides: object) -> GCAFlow:
    """A small GCAFlow whose learning rate changes every epoch (2-epoch warm-up), so a lost scheduler step shows."""
    settings = {
        "backbone": LITE0,
        "image_size": (64, 64),
        "depths": (1, 1, 1),
        "expansion": 1,
        "pos_embed_dim": 8,
        "lr": 1e-3,
        "warmup_epochs": 2,
        "max_epochs": EPOCHS,
        "visualizer": False,
    }
    settings.update(overrides)
    return GCAFlow(**settings)


def tiny_engine(root_dir: Path, **trainer_args: object) -> Engine:
    """A quiet single-process CPU engine."""
    settings = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    settings.update(trainer_args)
    return Engine(default_root_dir=root_dir, **settings)


class Interrupt(Callback):
    """Raise ``exception`` at the start of batch ``batch`` of epoch ``epoch``."""

    def __init__(self, epoch: int, batch: int, exception: BaseException) -> None:
        self.epoch, self.batch, self.exception = epoch, batch, exception

    def on_train_batch_start(self, trainer: Trainer, pl_module: GCAFlow, batch: object, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise self.exception


def _train(
    data: Path,
    root_dir: Path,
    seed: int = 0,
    callbacks: tuple[Callback, ...] = (),
    ckpt_path: Path | None = None,
) -> tuple[GCAFlow, Engine]:
    """Seed, build and fit a tiny model for EPOCHS epochs (8 images, 2 shuffled batches per epoch)."""
    seed_everything(seed)
    model = tiny_gcaflow()
    engine = tiny_engine(root_dir, max_epochs=EPOCHS, callbacks=list(callbacks))
    engine.fit(model, datamodule=tiny_datamodule(data), ckpt_path=ckpt_path)
    return model, engine


def _last_checkpoint(engine: Engine) -> Path:
    return LastEpochCheckpoint().path(engine.trainer)


@pytest.fixture(scope="module")
def uninterrupted(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Weights, optimiser state and test metrics of a run that was never interrupted."""
    model, engine = _train(tiny_folder, tmp_path_factory.mktemp("uninterrupted"))
    optimizer_state = engine.trainer.optimizers[0].state_dict()
    metrics = engine.test(model, datamodule=tiny_datamodule(tiny_folder), verbose=False)[0]
    return {"state": model.model.state_dict(), "optimizer": optimizer_state, "metrics": metrics}


def _assert_same_as_uninterrupted(model: GCAFlow, engine: Engine, data: Path, uninterrupted: dict) -> None:
    state = model.model.state_dict()
    assert state.keys() == uninterrupted["state"].keys()
    for key, value in uninterrupted["state"].items():
        # Permutation buffers included: they must come from the checkpoint, not from the resumed run's seed.
        assert torch.allclose(state[key].double(), value.double(), atol=1e-6), key
    resumed_optimizer = engine.trainer.optimizers[0].state_dict()
    assert resumed_optimizer["param_groups"][0]["lr"] == uninterrupted["optimizer"]["param_groups"][0]["lr"]
    for index, moments in uninterrupted["optimizer"]["state"].items():
        assert torch.allclose(resumed_optimizer["state"][index]["exp_avg_sq"], moments["exp_avg_sq"], rtol=1e-4)
    metrics = engine.test(model, datamodule=tiny_datamodule(data), verbose=False)[0]
    assert metrics.keys() == uninterrupted["metrics"].keys()
    for name, value in uninterrupted["metrics"].items():
        assert metrics[name] == pytest.approx(value, abs=1e-5), name


@pytest.mark.slow
def test_runtime_error_keeps_last_epoch_and_resume_matches_uninterrupted_run(
    tiny_folder: Path,
    tmp_path: Path,
    uninterrupted: dict,
) -> None:
    with pytest.raises(RuntimeError, match="disk on fire"):
        _train(tiny_folder, tmp_path / "crashed", callbacks=(Interrupt(1, 1, RuntimeError("disk on fire")),))
    last = next((tmp_path / "crashed").rglob("last.ckpt"))
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    # Epoch 0 finished; epoch 1 crashed after one of its two batches, which must not be in the file.
    assert checkpoint["epoch"] == 0
    assert checkpoint["global_step"] == 2
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == 1
    assert not list(last.parent.glob(".*.tmp"))

    # A different seed for the resumed run: everything that matters must come from the checkpoint.
    model, engine = _train(tiny_folder, tmp_path / "resumed", seed=123, ckpt_path=last)
    assert engine.trainer.current_epoch == EPOCHS
    _assert_same_as_uninterrupted(model, engine, tiny_folder, uninterrupted)


@pytest.mark.slow
def test_ctrl_c_keeps_last_epoch_and_resume_matches_uninterrupted_run(
    tiny_folder: Path,
    tmp_path: Path,
    uninterrupted: dict,
) -> None:
    handler = signal.getsignal(signal.SIGINT)
    try:
        # Lightning turns Ctrl-C into a graceful shutdown that ends in sys.exit(1).
        with pytest.raises(SystemExit):
            _train(tiny_folder, tmp_path / "interrupted", callbacks=(Interrupt(2, 0, KeyboardInterrupt()),))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C after the first
    last = next((tmp_path / "interrupted").rglob("last.ckpt"))
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 1

    model, engine = _train(tiny_folder, tmp_path / "resumed", seed=7, ckpt_path=last)
    _assert_same_as_uninterrupted(model, engine, tiny_folder, uninterrupted)


@pytest.mark.slow
def test_crash_while_saving_leaves_the_previous_checkpoint_whole(
    tiny_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    save = Trainer.save_checkpoint

    def save_then_die_in_epoch_1(trainer: Trainer, filepath: Path, *args: object, **kwargs: object) -> None:
        if trainer.current_epoch == 1 and Path(filepath).name.endswith(".tmp"):
            Path(filepath).write_bytes(b"half a checkpoint")
            raise KeyboardInterrupt
        save(trainer, filepath, *args, **kwargs)

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die_in_epoch_1)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            _train(tiny_folder, tmp_path)
    finally:
        signal.signal(signal.SIGINT, handler)
    last = next(tmp_path.rglob("last.ckpt"))
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 0
    assert not list(last.parent.glob(".*.tmp"))


def test_non_finite_loss_stops_before_the_step_and_names_the_checkpoint(tmp_path: Path) -> None:
    callback = LastEpochCheckpoint(dirpath=tmp_path)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    with pytest.raises(FloatingPointError, match=r"not finite.*No epoch had finished"):
        callback.on_before_backward(trainer, None, torch.tensor(float("nan")))
    (tmp_path / "last.ckpt").write_bytes(b"")
    with pytest.raises(FloatingPointError, match=f"last good epoch is in {tmp_path / 'last.ckpt'}"):
        callback.on_before_backward(trainer, None, torch.tensor(float("inf")))
    callback.on_before_backward(trainer, None, torch.tensor(-1e9))  # huge but finite losses are normal for flows
