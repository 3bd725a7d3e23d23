"""A user's own data: the real Magnetic Tile set, converted to the Folder layout, trains and tests GCAFlow.

The conversion (``python -m anomalib_gcaflow.data.magnetic_tile``) runs on an evenly spread subset of the real
images (30 defect-free, 10 of each of the 5 defect types) into a temporary folder; the source is read-only.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from anomalib.data import Folder
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from PIL import Image

from anomalib_gcaflow import GCAFlow
from anomalib_gcaflow.data import convert_magnetic_tile
from anomalib_gcaflow.data.magnetic_tile import MANIFEST, MASK_THRESHOLD, main

NORMAL_LIMIT = 30
LIMIT = 10
DEFECT_TYPES = ("Blowhole", "Break", "Crack", "Fray", "Uneven")


def _contents(root: Path) -> dict[str, str | bytes]:
    """Every file below ``root``: the link target of a link, the bytes of a file."""
    return {
        str(path.relative_to(root)): str(path.readlink()) if path.is_symlink() else path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_symlink() or path.is_file()
    }


def _modification_times(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.lstat().st_mtime_ns for path in root.rglob("*")}


@pytest.fixture(scope="module")
def converted(magnetic_tile_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Folder layout of the real data subset."""
    target = tmp_path_factory.mktemp("magnetic_tile") / "folder"
    report = convert_magnetic_tile(magnetic_tile_root, target, limit=LIMIT, normal_limit=NORMAL_LIMIT)
    assert report.normal == NORMAL_LIMIT
    assert report.defects == dict.fromkeys(DEFECT_TYPES, LIMIT)
    assert (report.written, report.unchanged, report.removed) == (NORMAL_LIMIT + 2 * 5 * LIMIT, 0, 0)
    return target


def test_conversion_layout_and_binary_masks(converted: Path, magnetic_tile_root: Path) -> None:
    """Images link to the source files; every defect image has a 0/255 mask of its size, thresholded at 128."""
    normal = sorted((converted / "good").iterdir())
    defects = sorted((converted / "defect").iterdir())
    masks = sorted((converted / "mask").iterdir())
    assert len(normal) == NORMAL_LIMIT
    assert all(path.readlink().parent == magnetic_tile_root.resolve() / "MT_Free" / "Imgs" for path in normal)
    assert len(defects) == len(masks) == 5 * LIMIT
    # Folder pairs images and masks in sorted order and checks that the image stem is in the mask stem.
    assert [path.stem for path in defects] == [path.stem for path in masks]
    for image, mask in zip(defects, masks, strict=True):
        source = image.readlink()
        assert image.name == f"{source.parent.parent.name.removeprefix('MT_')}_{source.name}"
        values = np.asarray(Image.open(mask))
        assert set(np.unique(values)) <= {0, 255}
        assert values.shape == Image.open(source).size[::-1]
        source_values = np.asarray(Image.open(source.with_suffix(".png")).convert("L"))
        np.testing.assert_array_equal(values == 255, source_values >= MASK_THRESHOLD)
    assert sum(np.asarray(Image.open(mask)).any() for mask in masks) >= 0.9 * len(masks), "masks lost their defects"


def test_conversion_is_idempotent_and_follows_a_new_limit(converted: Path, magnetic_tile_root: Path) -> None:
    """Running again changes nothing; a smaller subset afterwards removes the files it no longer holds."""
    contents, times = _contents(converted), _modification_times(converted)
    again = convert_magnetic_tile(magnetic_tile_root, converted, limit=LIMIT, normal_limit=NORMAL_LIMIT)
    assert (again.written, again.unchanged, again.removed) == (0, NORMAL_LIMIT + 2 * 5 * LIMIT, 0)
    assert _contents(converted) == contents
    assert _modification_times(converted) == times, "an unchanged file was rewritten"

    reused = converted.parent / "reused"
    shutil.copytree(converted, reused, symlinks=True)
    smaller = convert_magnetic_tile(magnetic_tile_root, reused, limit=2, normal_limit=4)
    assert smaller.removed > 0
    fresh = converted.parent / "fresh"
    convert_magnetic_tile(magnetic_tile_root, fresh, limit=2, normal_limit=4)
    assert _contents(reused) == _contents(fresh)
    assert len(list((reused / "good").iterdir())) == 4
    assert len(list((reused / "defect").iterdir())) == len(list((reused / "mask").iterdir())) == 2 * 5


def test_bad_source_and_target_give_one_clear_error(
    tmp_path: Path,
    magnetic_tile_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A wrong source, a target inside the source or a foreign non-empty target stop with one line naming it."""
    missing = tmp_path / "no_such_folder"
    with pytest.raises(SystemExit) as exit_info:
        main(["--source", str(missing), "--target", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert str(missing) in error
    assert "--source" in error
    assert not (tmp_path / "out").exists()

    with pytest.raises(FileNotFoundError, match="is not the Magnetic Tile data set"):
        convert_magnetic_tile(tmp_path, tmp_path / "out")

    # A tiny copy of the data set stands in for the source, so the real one is never at risk.
    source = tmp_path / "source"
    for folder, name in (("MT_Free", "exp0_num_743"), ("MT_Fray", "exp0_num_797")):
        (source / folder / "Imgs").mkdir(parents=True)
        for file_name in (f"{name}.jpg", f"{name}.png"):
            shutil.copyfile(magnetic_tile_root / folder / "Imgs" / file_name, source / folder / "Imgs" / file_name)
    with pytest.raises(ValueError, match="lies inside the source"):
        convert_magnetic_tile(source, source / "MT_Free" / "converted")
    assert not (source / "MT_Free" / "converted").exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=f"no {MANIFEST}"):
        convert_magnetic_tile(source, foreign)
    assert sorted(path.name for path in foreign.iterdir()) == ["notes.txt"]

    (source / "MT_Fray" / "Imgs" / "exp0_num_797.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"exp0_num_797\.jpg has no mask"):
        convert_magnetic_tile(source, tmp_path / "out")


@pytest.mark.slow
def test_gcaflow_trains_and_tests_through_folder(converted: Path, tmp_path: Path) -> None:
    """Folder reads the converted greyscale tiles of varying sizes; GCAFlow trains one epoch and is evaluated."""
    seed_everything(0)
    datamodule = Folder(
        name="magnetic_tile",
        root=converted,
        normal_dir="good",
        abnormal_dir="defect",
        mask_dir="mask",
        train_batch_size=8,
        eval_batch_size=8,
        num_workers=0,
        seed=0,
    )
    model = GCAFlow(
        backbone="tf_efficientnet_lite0",
        image_size=(128, 128),
        depths=[1, 1, 1],
        lr=1e-3,
        warmup_epochs=0,
        max_epochs=1,
    )
    engine = Engine(
        default_root_dir=tmp_path,
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
    )
    (results,) = engine.train(model, datamodule=datamodule)
    for metric in ("image_AUROC", "pixel_AUROC"):
        assert metric in results, f"{metric} missing from {sorted(results)}"
        assert math.isfinite(results[metric])
        assert 0 <= results[metric] <= 1
