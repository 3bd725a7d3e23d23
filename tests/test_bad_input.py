"""Bad input gets one clear error, naming the file or setting and the fix, before training starts."""

import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import ImageBatch, MVTecAD
from PIL import Image
from tiny_training import tiny_datamodule, tiny_engine, tiny_gcaflow

from anomalib_gcaflow.toolkit.data_checks import check_datasets, check_finite_images, explain_setup_failure


@pytest.fixture
def folder(tiny_folder: Path, tmp_path: Path) -> Path:
    """A fresh, writable copy of the small real-data Folder data set."""
    return Path(shutil.copytree(tiny_folder, tmp_path / "data"))


def _mvtec_layout(folder: Path) -> Path:
    """Rearrange the small Folder data set into MVTec AD's layout, category ``bottle``; return the root."""
    root = folder.parent / "mvtec"
    for source, target in (
        ("good", "train/good"),
        ("good_test", "test/good"),
        ("bad", "test/broken_large"),
        ("mask", "ground_truth/broken_large"),
    ):
        shutil.copytree(folder / source, root / "bottle" / target)
    return root


def _datasets(root: Path) -> dict:
    datamodule = tiny_datamodule(root)
    datamodule.setup()
    return {"train": datamodule.train_data, "val": datamodule.val_data, "test": datamodule.test_data}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _sixteen_bit_grey(path: Path) -> None:
    grey = np.asarray(Image.open(path).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(path)


BREAKAGES = {
    "truncated": (lambda root: _truncate(root / "good" / "002.png"), "good/002.png", "cannot be read"),
    "corrupt": (lambda root: (root / "bad" / "001.png").write_bytes(b"not a png"), "bad/001.png", "cannot be read"),
    "mask of another size": (
        lambda root: Image.open(root / "mask" / "002_mask.png").resize((32, 32)).save(root / "mask" / "002_mask.png"),
        "002_mask.png is 32x32",
        "differ in size",
    ),
    "16-bit greyscale": (lambda root: _sixteen_bit_grey(root / "good" / "004.png"), "good/004.png", "16-bit"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_each_bad_file_is_named_with_the_fix(folder: Path, breakage: str) -> None:
    breaks, names, problem = BREAKAGES[breakage]
    breaks(folder)
    with pytest.raises(ValueError, match=problem) as error:
        check_datasets(_datasets(folder))
    assert str(folder / names) in str(error.value) or names in str(error.value)
    assert str(error.value).count("\n- ") == 1  # one problem, reported once even though val and test share images


def test_all_problems_come_in_one_error_with_a_count(folder: Path) -> None:
    for name in ("000.png", "001.png", "002.png"):
        (folder / "bad" / name).write_bytes(b"")
    for index in range(5):
        (folder / "good" / f"10{index}.png").write_bytes(b"")
    Image.open(folder / "mask" / "000_mask.png").resize((10, 10)).save(folder / "mask" / "000_mask.png")
    with pytest.raises(ValueError, match=r"8 file\(s\) cannot be read.*and 3 more") as error:
        check_datasets(_datasets(folder))
    # An unreadable image's mask is not compared with it; the readable pair still is not in this data set.
    assert "differ in size" not in str(error.value)


def test_grey_palette_rgba_and_16_bit_rgb_images_are_read_fine(folder: Path) -> None:
    paths = sorted((folder / "good").glob("*.png"))
    reference = np.asarray(Image.open(paths[0]))
    Image.fromarray(reference).convert("L").save(paths[0])
    Image.fromarray(reference).convert("P").save(paths[1])
    rgba = np.dstack([reference, np.full(reference.shape[:2], 128, np.uint8)])
    Image.fromarray(rgba).save(paths[2])
    # PIL cannot write 16-bit RGB; OpenCV (an anomalib dependency) can. It stores BGR.
    import cv2

    cv2.imwrite(str(paths[3]), (reference[..., ::-1].astype(np.uint16) * 257))
    datasets = _datasets(folder)
    check_datasets(datasets)
    train = datasets["train"]
    images = {Path(train[i].image_path).name: train[i].image for i in range(len(train))}
    expected = torch.from_numpy(reference.copy()).permute(2, 0, 1).float() / 255
    for name in ("000.png", "001.png", "002.png", "003.png"):
        assert images[name].shape == (3, 64, 64), name
    assert torch.allclose(images["003.png"], expected, atol=1 / 255)  # 16-bit RGB reduced correctly
    assert torch.allclose(images["002.png"], expected, atol=1 / 255)  # RGBA: alpha dropped
    assert images["000.png"].std(dim=0).max() == 0  # greyscale: three equal channels


def test_broken_link_that_anomalib_rejects_without_a_name_is_named(folder: Path) -> None:
    (folder / "good_test" / "009.png").symlink_to(folder / "gone.png")
    datamodule = tiny_datamodule(folder)
    with pytest.raises(FileNotFoundError, match="missing file path"):
        datamodule.setup()
    explanation = explain_setup_failure(datamodule)
    assert explanation.startswith("1 image file(s) are listed in the data folders but do not exist")
    assert str(folder / "good_test" / "009.png") in explanation


def test_anomalous_image_whose_mask_vanished_is_named(folder: Path) -> None:
    datasets = _datasets(folder)
    (folder / "mask" / "001_mask.png").unlink()
    with pytest.raises(ValueError, match=r"1 anomalous image\(s\) have no mask: .*bad/001.png"):
        check_datasets(datasets)


def test_non_finite_batch_names_the_images() -> None:
    images = torch.zeros(3, 3, 8, 8)
    images[1, 0, 2, 2] = float("nan")
    images[2, 1, 0, 0] = float("inf")
    batch = ImageBatch(image=images, image_path=["a.png", "b.png", "c.png"])
    with pytest.raises(ValueError, match=r"2 image\(s\) hold NaN or infinite pixel values: b.png, c.png"):
        check_finite_images(batch)
    check_finite_images(ImageBatch(image=torch.zeros(1, 3, 8, 8), image_path=["a.png"]))


def test_finite_batch_whose_sum_overflows_passes() -> None:
    images = torch.full((2, 3, 8, 8), 3e38)  # every pixel finite, their float32 sum is not
    assert not torch.isfinite(images.sum())
    check_finite_images(ImageBatch(image=images, image_path=["a.png", "b.png"]))


@pytest.mark.slow
def test_bad_files_stop_fit_before_the_first_step(folder: Path, tmp_path: Path) -> None:
    _truncate(folder / "good" / "005.png")
    (folder / "bad" / "002.png").write_bytes(b"")  # a test image: found before training, not after it
    engine = tiny_engine(tmp_path / "results", max_epochs=1)
    with pytest.raises(ValueError, match=r"2 file\(s\) cannot be read") as error:
        engine.fit(tiny_gcaflow(), datamodule=tiny_datamodule(folder))
    assert "good/005.png" in str(error.value)
    assert "bad/002.png" in str(error.value)
    assert engine.trainer.global_step == 0
    assert not list((tmp_path / "results").rglob("*.ckpt"))


@pytest.mark.slow
def test_missing_mask_error_of_anomalib_is_explained(folder: Path, tmp_path: Path) -> None:
    (folder / "mask" / "001_mask.png").unlink()
    with pytest.raises(ValueError) as error:  # noqa: PT011 - the message is anomalib's (NumPy's); the note is ours
        tiny_engine(tmp_path, max_epochs=1).fit(tiny_gcaflow(), datamodule=tiny_datamodule(folder))
    note = "\n".join(getattr(error.value, "__notes__", []))
    assert f"1 anomalous image(s) have no mask (3 images, 2 masks): {folder / 'bad' / '001.png'}" in note


@pytest.mark.slow
def test_empty_training_set_is_an_error_before_training(folder: Path, tmp_path: Path) -> None:
    root = _mvtec_layout(folder)
    for image in (root / "bottle" / "train" / "good").iterdir():
        image.unlink()
    datamodule = MVTecAD(root=root, category="bottle", num_workers=0)
    with pytest.raises(ValueError, match=r"training set is empty.*train/good"):
        tiny_engine(tmp_path / "results", max_epochs=1).fit(tiny_gcaflow(), datamodule=datamodule)


@pytest.mark.slow
def test_wrong_category_download_error_names_the_setting(
    folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = _mvtec_layout(folder)

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Name or service not known")

    # Never download MVTec AD from a test, whether or not the machine has a network.
    monkeypatch.setattr("anomalib.data.datamodules.image.mvtecad.download_and_extract", offline)
    datamodule = MVTecAD(root=root, category="botle", num_workers=0)
    with pytest.raises(urllib.error.URLError) as error:
        tiny_engine(tmp_path / "results", max_epochs=1).fit(tiny_gcaflow(), datamodule=datamodule)
    note = "\n".join(getattr(error.value, "__notes__", []))
    assert f"{root / 'botle'}, which does not exist ({root} holds ['bottle'])" in note
    assert "--data.category" in note


def test_wrong_root_and_mvtec_missing_mask_are_explained(folder: Path) -> None:
    missing_root = folder.parent / "nowhere"
    explanation = explain_setup_failure(MVTecAD(root=missing_root, category="bottle"))
    assert f"{missing_root} does not exist either" in explanation
    root = _mvtec_layout(folder)
    assert explain_setup_failure(MVTecAD(root=root, category="bottle")) is None
    (root / "bottle" / "ground_truth" / "broken_large" / "002_mask.png").unlink()
    explanation = explain_setup_failure(MVTecAD(root=root, category="bottle"))
    assert explanation.startswith("1 anomalous image(s) have no mask")
    assert str(root / "bottle" / "test" / "broken_large" / "002.png") in explanation
