"""Nothing lost: an exception or Ctrl-C mid-training leaves the last finished epoch's checkpoint.

Resuming from it ends with the weights, optimiser state and test metrics of an uninterrupted run.
"""

import signal
from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import Callback, Trainer, seed_everything
from tiny_training import EPOCHS, tiny_datamodule, tiny_engine, tiny_gcaflow

from anomalib_gcaflow import GCAFlow
from anomalib_gcaflow.toolkit.callbacks import LastEpochCheckpoint


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
