"""Turn the Magnetic Tile defect data set, as downloaded, into a folder anomalib's ``Folder`` data module reads.

Data set: Huang, Qiu and Yuan, "Surface defect saliency of magnetic tile", The Visual Computer, 2020;
https://github.com/abin24/Magnetic-tile-defect-datasets.

The data set's own layout is ``MT_<Type>/Imgs/<name>.jpg`` with the pixel mask ``<name>.png`` beside it;
``MT_Free`` holds the defect-free tiles. ``Folder`` cannot read that directly: pointed at an ``Imgs`` folder it
takes the ``.png`` masks for images, and the masks are not binary (anomalib keeps only pixels equal to 255, so most
of each defect would be lost). This module writes::

    TARGET/
        good/<name>.jpg           defect-free tiles (links to the source images, or copies with ``--copy``)
        defect/<Type>_<name>.jpg  defective tiles, named after their defect type
        mask/<Type>_<name>.png    their masks, binarised to 0 / 255 (source pixels >= 128 are defect)
        magnetic_tile_folder.json what was converted, from where

which ``Folder(name="magnetic_tile", root=TARGET, normal_dir="good", abnormal_dir="defect", mask_dir="mask")``
reads as is. The source is only ever read. Running the conversion again with the same arguments changes nothing;
with other arguments it brings the target in line with them (and removes files of the earlier subset).

Usage::

    python -m anomalib_gcaflow.data.magnetic_tile --source ../shared/data/magnetic_tile --target datasets/mt
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

__all__ = ["MASK_THRESHOLD", "ConversionReport", "convert_magnetic_tile", "main"]

NORMAL_CLASS = "MT_Free"
CLASS_PREFIX = "MT_"
IMAGE_FOLDER = "Imgs"
IMAGE_SUFFIX = ".jpg"
MASK_SUFFIX = ".png"
NORMAL_DIR = "good"
ABNORMAL_DIR = "defect"
MASK_DIR = "mask"
MANIFEST = "magnetic_tile_folder.json"
# The data set's masks hold anti-aliased edges; the data set's documentation thresholds them at 128.
MASK_THRESHOLD = 128


@dataclass
class ConversionReport:
    """What a conversion did.

    Attributes:
        target (Path): The Folder-ready data set root.
        normal (int): Defect-free images in ``good/``.
        defects (dict[str, int]): Defective images in ``defect/`` per defect type.
        written (int): Files created or replaced in this run.
        unchanged (int): Files already correct from an earlier run.
        removed (int): Files of an earlier run's subset that are no longer part of the data set.
    """

    target: Path
    normal: int = 0
    defects: dict[str, int] = field(default_factory=dict)
    written: int = 0
    unchanged: int = 0
    removed: int = 0

    def summary(self) -> str:
        """Describe the result and how to train on it.

        Returns:
            str: A few lines for the user.
        """
        per_type = ", ".join(f"{name} {count}" for name, count in self.defects.items())
        return (
            f"Magnetic Tile in Folder layout at {self.target}:\n"
            f"  {NORMAL_DIR}/   {self.normal} defect-free images\n"
            f"  {ABNORMAL_DIR}/ {sum(self.defects.values())} defective images ({per_type})\n"
            f"  {MASK_DIR}/   {sum(self.defects.values())} masks, binarised at {MASK_THRESHOLD} to 0/255\n"
            f"Files written {self.written}, already up to date {self.unchanged}, removed {self.removed}.\n"
            f"Train with: anomalib train --model GCAFlow --data Folder --data.name magnetic_tile "
            f"--data.root {self.target} --data.normal_dir {NORMAL_DIR} --data.abnormal_dir {ABNORMAL_DIR} "
            f"--data.mask_dir {MASK_DIR} --model.backbone tf_efficientnet_lite0 ... (see docs/own-data.md)"
        )


def convert_magnetic_tile(
    source: str | Path,
    target: str | Path,
    limit: int | None = None,
    normal_limit: int | None = None,
    copy: bool = False,
) -> ConversionReport:
    """Write the Folder layout of the Magnetic Tile data set into ``target``.

    Args:
        source (str | Path): The data set as downloaded: the folder holding ``MT_Free``, ``MT_Blowhole``, ...
        target (str | Path): Where to write the Folder layout: a new or empty folder, or an earlier output of this
            conversion. Must not lie inside ``source``.
        limit (int | None, optional): Take at most this many images of each defect type (and of the defect-free
            ones, unless ``normal_limit`` is given), spread evenly over the sorted file names. ``None`` takes all.
            Defaults to ``None``.
        normal_limit (int | None, optional): At most this many defect-free images. ``None`` uses ``limit``.
            Defaults to ``None``.
        copy (bool, optional): Copy the images instead of linking to them (for file systems without symbolic
            links, or a target that must outlive the source). Defaults to ``False``.

    Returns:
        ConversionReport: Counts of the converted images and of the files written, kept and removed.

    Raises:
        FileNotFoundError: If ``source`` is not a Magnetic Tile folder, or a defective image has no mask.
        ValueError: If a limit is not positive, ``target`` lies inside ``source`` or holds other files, or a mask
            cannot be read or does not match its image's size.
    """
    source, target = Path(source).expanduser().resolve(), Path(target).expanduser().resolve()
    for name, value in (("limit", limit), ("normal_limit", normal_limit)):
        if value is not None and value < 1:
            msg = f"{name} must be a positive number of images per class, got {value}; omit it to convert everything."
            raise ValueError(msg)
    classes = _find_classes(source)
    _check_target(source, target)

    plan = _plan(source, classes, limit, normal_limit if normal_limit is not None else limit)
    report = ConversionReport(target=target, normal=sum(item.defect is None for item in plan))
    for item in plan:
        if item.defect is not None:
            report.defects[item.defect] = report.defects.get(item.defect, 0) + 1
    # The manifest comes first: it marks the folder as this conversion's even if the run is interrupted, so that
    # running again resumes instead of refusing the half-written folder.
    target.mkdir(parents=True, exist_ok=True)
    manifest = {
        "source": str(source),
        "limit": limit,
        "normal_limit": normal_limit,
        "copy": copy,
        "normal": report.normal,
        "defects": report.defects,
        "mask_threshold": MASK_THRESHOLD,
    }
    text = json.dumps(manifest, indent=2) + "\n"
    if not (target / MANIFEST).is_file() or (target / MANIFEST).read_text() != text:
        (target / MANIFEST).write_text(text)

    for kind in (NORMAL_DIR, ABNORMAL_DIR, MASK_DIR):
        (target / kind).mkdir(exist_ok=True)
    planned = set()
    for item in plan:
        planned.add(target / item.destination)
        _record(report, _place_image(item.image, target / item.destination, copy))
        if item.mask is not None:
            mask_destination = target / MASK_DIR / item.destination.with_suffix(MASK_SUFFIX).name
            planned.add(mask_destination)
            _record(report, _write_mask(item.mask, item.image, mask_destination))
    for kind in (NORMAL_DIR, ABNORMAL_DIR, MASK_DIR):
        for stale in sorted((target / kind).iterdir()):
            if stale not in planned and (stale.is_file() or stale.is_symlink()):
                stale.unlink()
                report.removed += 1
    return report


def _find_classes(source: Path) -> list[Path]:
    """Return the ``MT_*/Imgs`` folders, defect-free first, or explain why ``source`` is not the data set."""
    if not source.is_dir():
        msg = (
            f"Magnetic Tile source folder {source} does not exist. Pass --source the folder that holds MT_Free, "
            f"MT_Blowhole, ... (the data set as downloaded, e.g. ../shared/data/magnetic_tile)."
        )
        raise FileNotFoundError(msg)
    found = sorted(path for path in source.glob(f"{CLASS_PREFIX}*/{IMAGE_FOLDER}") if path.is_dir())
    normal = source / NORMAL_CLASS / IMAGE_FOLDER
    if normal not in found or len(found) < 2:
        msg = (
            f"{source} is not the Magnetic Tile data set: it needs {NORMAL_CLASS}/{IMAGE_FOLDER} and at least one "
            f"defect folder such as MT_Blowhole/{IMAGE_FOLDER} (found {[str(p.relative_to(source)) for p in found]}). "
            f"Pass --source the folder that holds the MT_* folders."
        )
        raise FileNotFoundError(msg)
    return [normal, *(path for path in found if path != normal)]


def _check_target(source: Path, target: Path) -> None:
    """Refuse a target inside the source, or a non-empty folder this conversion did not write."""
    if target == source or target.is_relative_to(source):
        msg = f"target {target} lies inside the source {source}, which is never written to; choose another folder."
        raise ValueError(msg)
    if target.exists() and not target.is_dir():
        msg = f"target {target} exists and is not a folder; choose a new or empty folder."
        raise ValueError(msg)
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).is_file():
        msg = (
            f"target {target} already holds files that this conversion did not write (no {MANIFEST}); "
            f"choose a new or empty folder so that nothing of yours is overwritten or removed."
        )
        raise ValueError(msg)


def _evenly_spaced(items: list[Path], count: int | None) -> list[Path]:
    """Take ``count`` items spread over the whole list (all of them if ``count`` is ``None`` or larger)."""
    if count is None or count >= len(items):
        return items
    return [items[index * len(items) // count] for index in range(count)]


class _Item(NamedTuple):
    """One image to convert: where it comes from and goes to, its mask and defect type (``None`` if normal)."""

    image: Path
    destination: Path
    mask: Path | None
    defect: str | None


def _plan(source: Path, classes: Sequence[Path], limit: int | None, normal_limit: int | None) -> list[_Item]:
    """List every image to convert, checking that each defective one has its mask."""
    plan: list[_Item] = []
    for folder in classes:
        images = sorted(folder.glob(f"*{IMAGE_SUFFIX}"))
        if not images:
            msg = f"no {IMAGE_SUFFIX} images in {folder}; is the Magnetic Tile download at {source} complete?"
            raise FileNotFoundError(msg)
        if folder.parent.name == NORMAL_CLASS:
            plan += [
                _Item(image, Path(NORMAL_DIR) / image.name, None, None)
                for image in _evenly_spaced(images, normal_limit)
            ]
            continue
        defect = folder.parent.name.removeprefix(CLASS_PREFIX)
        for image in _evenly_spaced(images, limit):
            mask = image.with_suffix(MASK_SUFFIX)
            if not mask.is_file():
                msg = f"defective image {image} has no mask {mask.name} beside it; restore it from the download."
                raise FileNotFoundError(msg)
            plan.append(_Item(image, Path(ABNORMAL_DIR) / f"{defect}_{image.name}", mask, defect))
    return plan


def _record(report: ConversionReport, written: bool) -> None:
    if written:
        report.written += 1
    else:
        report.unchanged += 1


def _place_image(image: Path, destination: Path, copy: bool) -> bool:
    """Link (or copy) one image; return whether anything was written."""
    if copy:
        if destination.is_file() and not destination.is_symlink() and _same_bytes(image, destination):
            return False
        temporary = destination.with_name(destination.name + ".tmp")
        shutil.copyfile(image, temporary)
    else:
        if destination.is_symlink() and destination.readlink() == image:
            return False
        temporary = destination.with_name(destination.name + ".tmp")
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(image)
    # Renaming over the old file keeps the target valid even if the conversion is interrupted.
    temporary.replace(destination)
    return True


def _same_bytes(first: Path, second: Path) -> bool:
    return first.stat().st_size == second.stat().st_size and first.read_bytes() == second.read_bytes()


def _write_mask(mask: Path, image: Path, destination: Path) -> bool:
    """Binarise one mask to 0 / 255 as an 8-bit PNG; return whether anything was written."""
    values = np.asarray(_open(mask).convert("L"))
    image_size = _open(image).size
    if values.shape[::-1] != image_size:
        msg = (
            f"mask {mask} is {values.shape[1]}x{values.shape[0]} but its image {image.name} is "
            f"{image_size[0]}x{image_size[1]}; replace the pair from the Magnetic Tile download."
        )
        raise ValueError(msg)
    binary = np.where(values >= MASK_THRESHOLD, 255, 0).astype(np.uint8)
    if destination.is_file() and np.array_equal(np.asarray(_open(destination)), binary):
        return False
    temporary = destination.with_name(destination.name + ".tmp")
    Image.fromarray(binary).save(temporary, format="PNG")
    temporary.replace(destination)
    return True


def _open(path: Path) -> Image.Image:
    """Read and decode an image file completely, or say which file is broken."""
    try:
        with Image.open(path) as opened:
            return opened.copy()  # decodes every pixel, so a truncated file fails here
    except OSError as error:  # PIL's UnidentifiedImageError is one
        msg = f"cannot read {path} ({error}); replace it with the file from the Magnetic Tile download."
        raise ValueError(msg) from error


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: convert, print what was done, exit 2 with one line on bad input.

    Args:
        argv (Sequence[str] | None, optional): Arguments; ``None`` reads ``sys.argv``. Defaults to ``None``.

    Returns:
        int: The exit status, 0 on success.
    """
    parser = argparse.ArgumentParser(
        prog="python -m anomalib_gcaflow.data.magnetic_tile",
        description="Write the Magnetic Tile data set in the layout anomalib's Folder data module reads.",
    )
    parser.add_argument("--source", required=True, help="folder holding MT_Free, MT_Blowhole, ... (read only)")
    parser.add_argument("--target", required=True, help="new or empty folder, or an earlier output, to write to")
    parser.add_argument("--limit", type=int, help="at most this many images per class (default: all)")
    parser.add_argument("--normal-limit", type=int, help="at most this many defect-free images (default: --limit)")
    parser.add_argument("--copy", action="store_true", help="copy the images instead of linking to them")
    args = parser.parse_args(argv)
    try:
        report = convert_magnetic_tile(args.source, args.target, args.limit, args.normal_limit, args.copy)
    except (OSError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
