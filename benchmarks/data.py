"""The data sets of the accuracy and convergence benchmarks: MVTec AD bottle and Magnetic Tile.

Both are read from the real sets, never downloaded: bottle as it is (or a fixed subset under ``--limit``), Magnetic
Tile converted once to anomalib's ``Folder`` layout in the scratch folder.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from anomalib.data import Folder, MVTecAD

from anomalib_gcaflow.data.magnetic_tile import (
    ABNORMAL_DIR,
    MASK_DIR,
    NORMAL_DIR,
    convert_magnetic_tile,
)
from benchmarks.protocol import DATASETS, Settings
from benchmarks.records import mkdir


def build_datamodule(dataset: str, settings: Settings) -> tuple[Any, dict[str, Any]]:
    """Build the data module of one data set; the validation split is the test set for both.

    anomalib fits the F1 threshold and the score normalisation on the validation split. MVTecAD uses the test set
    for it by default; Folder would otherwise hold out half of the test set, so both use ``same_as_test`` and test
    on every test image.

    Args:
        dataset: ``"bottle"`` or ``"magnetic_tile"``.
        settings: The invocation's settings.

    Returns:
        tuple[Any, dict[str, Any]]: The data module and a description (source, subset).
    """
    protocol = settings.protocol
    loader_args = {
        "train_batch_size": protocol.train_batch_size,
        "eval_batch_size": protocol.eval_batch_size,
        "num_workers": settings.num_workers,
        "val_split_mode": "same_as_test",
        "seed": 0,
    }
    if dataset == "bottle":
        description: dict[str, Any] = {"source": str(settings.data_root / "mvtec_ad"), "category": "bottle"}
        if protocol.limit is not None:
            description["subset"] = (
                f"at most {protocol.limit} training images and {protocol.limit} test images per class"
            )
        return MVTecAD(root=bottle_root(settings), category="bottle", **loader_args), description
    if dataset == "magnetic_tile":
        return _magnetic_tile_datamodule(settings, loader_args)
    msg = f"Unknown data set {dataset!r}; choose from {', '.join(DATASETS)}."
    raise ValueError(msg)


def _magnetic_tile_datamodule(settings: Settings, loader_args: dict[str, Any]) -> tuple[Folder, dict[str, Any]]:
    """Convert (once; later calls find it done) the Magnetic Tile subset of the protocol and read it with ``Folder``.

    Args:
        settings: The invocation's settings.
        loader_args: Batch sizes, workers, split modes and seed shared with the other data set.

    Returns:
        tuple[Folder, dict[str, Any]]: The data module and a description of the subset.
    """
    protocol = settings.protocol
    source = settings.data_root / "magnetic_tile"
    _require(source / "MT_Free" / "Imgs", "Magnetic Tile")
    limit = protocol.magnetic_tile_limit
    # The converter's own rule: without a defect-free cap, the per-type cap applies to the defect-free images too.
    normal_limit = protocol.magnetic_tile_normal_limit if protocol.magnetic_tile_normal_limit is not None else limit
    target = settings.work_dir / "data" / f"magnetic_tile_defects{limit or 'all'}_normal{normal_limit or 'all'}"
    report = convert_magnetic_tile(source, target, limit=limit, normal_limit=normal_limit)
    description = {
        "source": str(source),
        "category": "magnetic_tile",
        "converted_to": str(target),
        "converted_with": "anomalib_gcaflow.data.magnetic_tile.convert_magnetic_tile (masks binarised at 128)",
        "defect_free_images": report.normal,
        "defective_images": report.defects,
        "subset": (
            f"{'all' if limit is None else f'at most {limit}'} defective images per type and "
            f"{'all' if normal_limit is None else f'at most {normal_limit}'} defect-free images, evenly spaced "
            "over the sorted file names; 20 % of the defect-free images are held out for testing (seed 0)"
        ),
    }
    datamodule = Folder(
        name="magnetic_tile",
        root=target,
        normal_dir=NORMAL_DIR,
        abnormal_dir=ABNORMAL_DIR,
        mask_dir=MASK_DIR,
        test_split_ratio=0.2,
        **loader_args,
    )
    return datamodule, description


def defect_type(image_path: str) -> str:
    """Name the defect type of an anomalous test image from its path, in either data set's layout.

    MVTec AD keeps each type in its own folder (``test/broken_large/000.png``); the converted Magnetic Tile keeps
    every defect in ``defect/`` and names the file after its type (``defect/Blowhole_exp1_num_4727.jpg``).

    Args:
        image_path: Path of the image.

    Returns:
        str: The defect type.
    """
    path = Path(image_path)
    if path.parent.name == ABNORMAL_DIR:
        return path.name.split("_", 1)[0]
    return path.parent.name


def bottle_root(settings: Settings) -> Path:
    """Return the MVTec AD root holding this protocol's bottle images (a copied subset under ``--limit``).

    Args:
        settings: The invocation's settings.

    Returns:
        Path: The root.
    """
    root = settings.data_root / "mvtec_ad"
    _require(root / "bottle" / "train" / "good", "MVTec AD bottle")
    limit = settings.protocol.limit
    return root if limit is None else _mvtec_subset(root, "bottle", limit, settings.work_dir)


def _require(path: Path, what: str) -> None:
    """Fail with the fix if a data folder is missing (anomalib would try to download it instead).

    Args:
        path: Folder that must exist.
        what: Name of the data set.
    """
    if not path.is_dir():
        msg = f"{what} not found: {path} is missing. Pass --data-root pointing to the folder that holds it."
        raise FileNotFoundError(msg)


def _mvtec_subset(root: Path, category: str, limit: int, work_dir: Path) -> Path:
    """Copy an MVTec-layout subset: ``limit`` training images, ``limit`` test images per class, with their masks.

    Images are drawn with a fixed seed, so every model and every seed sees the same subset. They are copied, not
    linked: anomalib drops files whose resolved path lies outside the data root.

    Args:
        root: The MVTec AD root.
        category: Category folder.
        limit: Images per split and class.
        work_dir: Scratch folder.

    Returns:
        Path: Root of the subset.
    """
    target = work_dir / "data" / f"mvtec_{category}_limit{limit}"
    if (target / category).is_dir():
        return target
    staging = Path(tempfile.mkdtemp(dir=mkdir(work_dir / "data")))
    rng = random.Random(0)
    for class_dir in sorted([root / category / "train" / "good", *sorted((root / category / "test").iterdir())]):
        images = sorted(class_dir.glob("*.png"))
        chosen = sorted(rng.sample(images, min(limit, len(images))))
        relative = class_dir.relative_to(root)
        mkdir(staging / relative)
        for image in chosen:
            shutil.copy2(image, staging / relative / image.name)
            mask = root / category / "ground_truth" / relative.name / f"{image.stem}_mask.png"
            if relative.parts[1] == "test" and mask.is_file():
                mkdir(staging / category / "ground_truth" / relative.name)
                shutil.copy2(mask, staging / category / "ground_truth" / relative.name / mask.name)
    staging.replace(target)
    return target
