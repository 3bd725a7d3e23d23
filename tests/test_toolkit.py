"""The training toolkit attaches to a stock anomalib model (Padim) with one call, and GCAFlow uses that same call."""

import shutil
from pathlib import Path

import pytest
import torch
from anomalib.models import Padim
from lightning.pytorch import Callback
from tiny_training import tiny_datamodule, tiny_engine, tiny_gcaflow

from anomalib_gcaflow.toolkit import (
    CachedImagePlaceholders,
    DataCheck,
    DistributedEvaluation,
    LastEpochCheckpoint,
    SkipCachedImageReads,
    training_callbacks,
)

GUARDS = [DataCheck, LastEpochCheckpoint, DistributedEvaluation]


def _padim() -> Padim:
    # Random backbone weights: the test is about the callbacks, and the hub is offline.
    return Padim(backbone="resnet18", pre_trained=False, visualizer=False)


def _types(callbacks: list[Callback]) -> list[type]:
    return [type(callback) for callback in callbacks]


def test_training_callbacks_surround_the_model_callbacks() -> None:
    components = _padim().configure_callbacks()
    callbacks = training_callbacks(components)
    assert _types(callbacks) == [SkipCachedImageReads, *_types(components), *GUARDS]
    assert callbacks[1:-3] == list(components)
    assert _types(training_callbacks()) == [SkipCachedImageReads, *GUARDS]


def test_gcaflow_turns_the_toolkit_on_through_the_same_call() -> None:
    model = tiny_gcaflow()
    components = super(type(model), model).configure_callbacks()
    assert _types(model.configure_callbacks()) == _types(training_callbacks(components))


@pytest.mark.slow
def test_padim_fits_and_tests_with_the_toolkit_on_real_bottle_images(tiny_folder: Path, tmp_path: Path) -> None:
    datamodule = tiny_datamodule(tiny_folder)
    engine = tiny_engine(tmp_path / "results", callbacks=training_callbacks())
    model = _padim()
    engine.fit(model, datamodule=datamodule)
    # Padim keeps no feature cache: its training set is left as it is.
    assert not isinstance(datamodule.train_data, CachedImagePlaceholders)
    last = next(c for c in engine.trainer.callbacks if isinstance(c, LastEpochCheckpoint)).path(engine.trainer)
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 0
    assert "rng_states" in checkpoint["callbacks"]["LastEpochCheckpoint"]
    assert checkpoint["state_dict"].keys() == model.state_dict().keys()

    metrics = engine.test(model, datamodule=datamodule, verbose=False)[0]
    for name in ("image_AUROC", "pixel_AUROC"):
        assert 0.0 <= metrics[name] <= 1.0, (name, metrics[name])


@pytest.mark.slow
def test_padim_with_the_toolkit_stops_on_a_bad_file_before_training(tiny_folder: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_folder, tmp_path / "data"))
    (folder / "good" / "003.png").write_bytes(b"not a png")
    engine = tiny_engine(tmp_path / "results", callbacks=training_callbacks())
    with pytest.raises(ValueError, match=r"1 file\(s\) cannot be read") as error:
        engine.fit(_padim(), datamodule=tiny_datamodule(folder))
    assert "good/003.png" in str(error.value)
    assert engine.trainer.global_step == 0
