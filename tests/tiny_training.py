"""Small real-data training set-ups shared by the reliability tests (resume, bad input, determinism, DDP).

The ``tiny_folder`` fixture that builds the data set once per session is in ``conftest.py``.
"""

from pathlib import Path

from anomalib.data import Folder
from anomalib.engine import Engine
from PIL import Image

from anomalib_gcaflow import GCAFlow

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
