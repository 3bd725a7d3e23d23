"""Checks of a data module's files, run before the first epoch.

anomalib reads an image only when a batch needs it, so a corrupt file stops training at the batch that holds it,
hours in, with an error that may not name it; and some problems never raise at all: a mask of the wrong size, or a
16-bit greyscale image, which anomalib 2.7's ``read_image`` converts to RGB by clipping every value above 255 (the
image turns almost white). :func:`check_datasets` reads every file of the train, validation and test sets up
front and reports every problem in one error; :func:`check_image_files` does the same for a bare list of images,
such as the folder given to ``anomalib predict``.

Some mistakes make anomalib's own data-module setup fail before any of this can run, with an error that does not
say why: a wrong ``root`` or ``category`` (anomalib then tries to download the data set), or an anomalous image
without a mask (a pandas or NumPy length error). :func:`explain_setup_failure` finds these causes on disk, to be
attached to anomalib's error.
"""

import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import torch
from anomalib.data import AnomalibDataModule, AnomalibDataset, Folder, MVTecAD
from anomalib.data.utils import LabelName, resolve_path
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

# PIL modes of single-channel images deeper than 8 bits; anomalib's ``convert("RGB")`` clips them to 0..255.
CLIPPED_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# How many offending files an error message names before it only counts the rest.
NAMED_FILES = 5


class FileInfo(NamedTuple):
    """What reading one image or mask file gave.

    Attributes:
        size (tuple[int, int] | None): ``(width, height)``, or ``None`` if the file could not be read.
        mode (str | None): PIL mode (``"RGB"``, ``"L"``, ``"I;16"``, ...), or ``None`` if unread.
        error (str | None): Why the file could not be read, or ``None``.
    """

    size: tuple[int, int] | None
    mode: str | None
    error: str | None


def read_file_info(path: str) -> FileInfo:
    """Open and fully decode one image file, as anomalib will do when a batch needs it.

    Decoding the whole file, not only its header, is what catches truncated files.

    Args:
        path (str): Image or mask file.

    Returns:
        FileInfo: Its size and mode, or why it could not be read.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return FileInfo(image.size, image.mode, None)
    # Decoders raise many exception types (OSError, SyntaxError, ValueError, DecompressionBombError, ...); any
    # of them means anomalib could not read the file either.
    except Exception as exc:  # noqa: BLE001
        return FileInfo(None, None, f"{type(exc).__name__}: {exc}")


def check_datasets(datasets: Mapping[str, AnomalibDataset]) -> None:
    """Read every file of ``datasets`` once and raise one ``ValueError`` that describes every problem found.

    Problems: an empty training set; an image or mask that cannot be opened or decoded (missing, unreadable,
    corrupt, truncated); a 16-bit or floating-point greyscale image (see the module docstring); an anomalous image
    without a mask in a data set that has masks; a mask whose size differs from its image's. 8-bit greyscale,
    palette, RGBA and 16-bit RGB images are fine: anomalib converts them to 8-bit RGB correctly.

    Args:
        datasets (Mapping[str, AnomalibDataset]): Data sets by split name (``"train"``, ``"val"``, ``"test"``).
            An empty ``"train"`` set is an error; empty evaluation sets are not.

    Raises:
        ValueError: If any problem was found; it names the files (the first few and a count) and the fix.
    """
    problems = []
    if "train" in datasets and len(datasets["train"]) == 0:
        problems.append(
            "the training set is empty: GCAFlow learns from normal images and found none. Point the data module "
            "at a folder of normal images (MVTecAD: <root>/<category>/train/good; Folder: normal_dir).",
        )
    pairs, missing_masks = _image_mask_pairs(datasets.values())
    images = {image for image, _ in pairs}
    info = _read_all(images | {mask for _, mask in pairs if mask})
    mismatched = []
    for image, mask in sorted(pairs):
        image_size, mask_size = info[image].size, info[mask].size if mask else None
        if image_size and mask_size and image_size != mask_size:
            mismatched.append(f"{mask} is {_size(mask_size)}, {image} is {_size(image_size)}")
    problems += [
        *_file_problems(info, images),
        _describe(
            missing_masks,
            "anomalous image(s) have no mask",
            "Add a mask for each (same file stem, e.g. 000.png -> 000_mask.png), or drop mask_dir to evaluate "
            "image-level only.",
        ),
        _describe(
            mismatched,
            "mask(s) differ in size from their image",
            "A mask must have its image's width and height; resize it with nearest-neighbour interpolation or "
            "replace it.",
        ),
    ]
    _raise_if_any(problems, "before training")


def check_image_files(paths: Iterable[str | Path]) -> None:
    """Read every image in ``paths`` once and raise one ``ValueError`` naming those that cannot be used.

    This is the check for data that comes as a bare list of files, such as the folder given to
    ``anomalib predict``: there are no masks or labels to check, only the images themselves.

    Args:
        paths (Iterable[str | Path]): Image files.

    Raises:
        ValueError: If an image cannot be opened or decoded, or is 16-bit or floating-point greyscale.
    """
    images = {str(path) for path in paths}
    _raise_if_any(_file_problems(_read_all(images), images), "before predicting")


def check_finite_images(batch: Any) -> None:  # noqa: ANN401
    """Raise if a batch's images hold NaN or infinite values, naming the images.

    Args:
        batch (Any): An anomalib batch (``image`` and, where known, ``image_path``); other objects pass.

    Raises:
        ValueError: If any pixel is NaN or infinite.
    """
    images = getattr(batch, "image", None)
    # A NaN or infinity anywhere makes the sum non-finite, and one reduction costs a tenth of isfinite's mask over
    # every pixel; a non-finite sum of finite pixels (overflow) falls through to the exact check.
    if not isinstance(images, torch.Tensor) or torch.isfinite(images.sum()) or torch.isfinite(images).all():
        return
    bad = (~torch.isfinite(images)).flatten(1).any(dim=1).nonzero().flatten().tolist()
    paths = getattr(batch, "image_path", None)
    names = [str(paths[i]) if paths is not None else f"#{i} of the batch" for i in bad]
    msg = (
        f"{len(bad)} image(s) hold NaN or infinite pixel values: {', '.join(names)}. Images read from files cannot; "
        f"check the data set's augmentations or transforms, or the tensors passed to the model."
    )
    raise ValueError(msg)


def explain_setup_failure(datamodule: AnomalibDataModule) -> str | None:
    """Find, on disk, why anomalib's own setup of ``datamodule`` may have failed.

    Args:
        datamodule (AnomalibDataModule): The data module whose ``prepare_data`` or ``setup`` raised.

    Returns:
        str | None: A sentence naming the setting or files at fault and the fix, or ``None`` if no known cause
        was found.
    """
    if isinstance(datamodule, Folder):
        folders = {
            kind: [resolve_path(folder, datamodule.root) for folder in _as_list(getattr(datamodule, kind))]
            for kind in ("normal_dir", "normal_test_dir", "abnormal_dir", "mask_dir")
        }
        causes = [_explain_broken_links(_image_files(path for paths in folders.values() for path in paths))]
        masks = _image_files(folders["mask_dir"])
        if masks:
            causes.append(_explain_missing_masks(_image_files(folders["abnormal_dir"]), masks))
        return " ".join(cause for cause in causes if cause) or None
    root, category = getattr(datamodule, "root", None), getattr(datamodule, "category", None)
    if root is None or not category:
        return None
    category_dir = Path(root) / category
    if not category_dir.is_dir():
        found = sorted(p.name for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else None
        where = f"{root} holds {found}" if found is not None else f"{root} does not exist either"
        return (
            f"the data of category {category!r} was expected in {category_dir}, which does not exist ({where}). "
            f"anomalib downloads a data set it cannot find, so a wrong root or category shows up as a download "
            f"error. Fix the data module's root or category (--data.root, --data.category)."
        )
    causes = [_explain_broken_links(_image_files([category_dir]))]
    if isinstance(datamodule, MVTecAD) and (category_dir / "test").is_dir():
        defects = [d for d in (category_dir / "test").iterdir() if d.is_dir() and d.name != "good"]
        masks = _image_files(category_dir / "ground_truth" / d.name for d in defects)
        causes.append(_explain_missing_masks(_image_files(defects), masks))
    return " ".join(cause for cause in causes if cause) or None


def _read_all(paths: Iterable[str]) -> dict[str, FileInfo]:
    """Read ``paths`` in parallel threads (decoding releases the GIL), keyed by path."""
    to_read = sorted(paths)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(to_read, pool.map(read_file_info, to_read), strict=True))


def _file_problems(info: Mapping[str, FileInfo], images: Iterable[str]) -> list[str]:
    """Problem lines for files that could not be read and for ``images`` that anomalib would clip."""
    unreadable = [f"{path} ({file.error})" for path, file in info.items() if file.error]
    clipped = [f"{path} (mode {info[path].mode})" for path in sorted(images) if info[path].mode in CLIPPED_MODES]
    return [
        _describe(unreadable, "file(s) cannot be read", "Replace or delete them, then start again."),
        _describe(
            clipped,
            "image(s) are 16-bit or floating-point greyscale, which anomalib reads by clipping to 8 bits (they "
            "turn almost white)",
            "Convert them to 8-bit first, e.g. with PIL: Image.fromarray((np.asarray(img) >> 8).astype(np.uint8)) "
            "for 16-bit PNGs.",
        ),
    ]


def _raise_if_any(problems: Sequence[str], when: str) -> None:
    """Raise one ``ValueError`` listing the non-empty ``problems``, found ``when`` (e.g. "before training")."""
    problems = [problem for problem in problems if problem]
    if problems:
        msg = f"GCAFlow checked the data {when} and found:\n- " + "\n- ".join(problems)
        raise ValueError(msg)


def _image_mask_pairs(datasets: Iterable[AnomalibDataset]) -> tuple[set[tuple[str, str]], list[str]]:
    """Collect ``(image, mask)`` path pairs (mask ``""`` where none is expected) and anomalous images lacking one."""
    pairs, missing = set(), []
    for dataset in datasets:
        has_masks = dataset.task == "segmentation"
        for image, mask, label in zip(
            dataset.samples.image_path,
            dataset.samples.mask_path,
            dataset.samples.label_index,
            strict=True,
        ):
            mask = mask if isinstance(mask, str) else ""  # None and NaN mean "no mask" as much as ""
            anomalous = has_masks and label == LabelName.ABNORMAL
            if anomalous and not Path(mask).is_file():
                missing.append(f"{image} (expected mask: {mask or 'none given'})")
                mask = ""
            pairs.add((str(image), mask if anomalous else ""))
    return pairs, sorted(set(missing))


def _explain_broken_links(files: list[Path]) -> str:
    """Name the listed image files that do not exist (broken links), which anomalib rejects without naming."""
    return _describe(
        [str(path) for path in files if not path.exists()],
        "image file(s) are listed in the data folders but do not exist (broken links)",
        "Restore their targets or delete them.",
    )


def _explain_missing_masks(images: list[Path], masks: list[Path]) -> str:
    """Name the anomalous images whose stem is in no mask's stem, anomalib's rule for pairing them."""
    mask_stems = [mask.stem for mask in masks]
    orphans = [str(image) for image in images if not any(image.stem in stem for stem in mask_stems)]
    return _describe(
        orphans,
        f"anomalous image(s) have no mask ({len(images)} images, {len(masks)} masks)",
        "Add a mask for each (same file stem, e.g. 000.png -> 000_mask.png), or remove the image.",
    )


def _image_files(folders: Iterable[Path]) -> list[Path]:
    """List the image files under ``folders`` (recursively), as anomalib's data sets find them."""
    return sorted(
        path
        for folder in folders
        if folder.is_dir()
        for path in folder.glob("**/*")
        if path.suffix.lower() in IMG_EXTENSIONS and not path.is_dir()
    )


def _as_list(value: str | Path | Sequence[str | Path] | None) -> list[str | Path]:
    """Normalise a Folder directory argument (one path, several, or none) to a list."""
    if value is None:
        return []
    return [value] if isinstance(value, str | Path) else list(value)


def _size(size: tuple[int, int]) -> str:
    """Format a ``(width, height)`` size as ``WxH``."""
    return f"{size[0]}x{size[1]}"


def _describe(items: Sequence[str], what: str, fix: str) -> str:
    """One problem line: count, what is wrong, the first few items, the fix; ``""`` if there are no items."""
    if not items:
        return ""
    named = "; ".join(items[:NAMED_FILES])
    if len(items) > NAMED_FILES:
        named += f"; and {len(items) - NAMED_FILES} more"
    return f"{len(items)} {what}: {named}. {fix}"
