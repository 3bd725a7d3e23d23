"""Training feature cache: each training (and validation) image's pooled backbone features are computed once and reused.

The backbone is frozen and, without random augmentation, the training pre-processing is deterministic, so an
image gives the same flow inputs in every epoch. Flow models nevertheless re-run the backbone for every image in
every epoch; this cache runs it once per image and serves the stored features afterwards.

* Entries are keyed by image path and input size. The whole cache is bound to a fingerprint of everything else
  the features depend on (backbone architecture and weights, pooling, pre-processing transforms, precision) and is
  emptied when the fingerprint changes.
* Entries live in CPU memory up to a byte budget; later entries spill to one file each in a private temporary
  folder, deleted when the cache is cleared or garbage-collected.
* The cache never travels with the model: pickling (``export --export_type torch``, DDP spawn, deep copies)
  keeps the settings and drops the entries, and nothing is registered as a buffer, so checkpoints hold none.
* Under DDP every process owns its module and therefore its own cache of the images its sampler gives it.

Validation inside a fit (anomalib validates after every epoch by default) runs the same frozen backbone on the same
validation images every time; their features are cached too, under keys that name the validation transforms, and
dropped with the rest when training ends.

Once an image's features are cached, reading it again is the next waste: decoding the file, building its mask and
resizing both cost more, per cached epoch, than a quarter of GCAFlow's training step on a CPU.
:class:`CachedImagePlaceholders` wraps the training data set so that an image whose features are cached is not
read at all: its item is served as a placeholder whose image is a zero-strided tensor of the right shape.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "CachedImagePlaceholders",
    "FeatureCache",
    "feature_fingerprint",
    "is_deterministic",
    "stage_transforms",
    "transforms_digest",
]

DEFAULT_CACHE_BYTES = 2 * 1024**3

# Transforms whose output depends on their input only. Anything else (RandomXxx, ColorJitter, Lambda, unknown
# third-party transforms) is treated as random, which turns the cache off rather than risking stale features.
_DETERMINISTIC_TRANSFORMS = (
    v2.CenterCrop,
    v2.ConvertImageDtype,
    v2.Grayscale,
    v2.Identity,
    v2.Normalize,
    v2.Pad,
    v2.PILToTensor,
    v2.RGB,
    v2.Resize,
    v2.ToDtype,
    v2.ToImage,
    v2.ToPureTensor,
    v2.ToTensor,
)


def is_deterministic(transform: Any) -> bool:  # noqa: ANN401 - any torchvision or user transform
    """Tell whether a transform certainly gives the same output for the same image every time.

    Args:
        transform (Any): A torchvision transform, a ``Compose`` of them, or ``None`` (no transform).

    Returns:
        bool: ``True`` for ``None`` and for (compositions of) known deterministic transforms; ``False`` otherwise.
    """
    if transform is None:
        return True
    if isinstance(transform, v2.Compose):
        return all(is_deterministic(child) for child in transform.transforms)
    return isinstance(transform, _DETERMINISTIC_TRANSFORMS)


def stage_transforms(trainer: Trainer, stage: str = "train") -> list[Any]:
    """Collect every transform applied to a stage's images before they reach the model's pre-processor.

    These are the datamodule's ``train_augmentations`` (``val_augmentations``) and the ``augmentations`` of each
    training (validation) dataset (anomalib appends the model's resize to the latter).

    Args:
        trainer (Trainer): A trainer inside ``fit``, after the stage's dataloaders are set up.
        stage (str, optional): ``"train"`` or ``"val"``. Defaults to ``"train"``.

    Returns:
        list[Any]: The transforms found, ``None`` entries left out.

    Raises:
        ValueError: If ``stage`` is neither ``"train"`` nor ``"val"``.
    """
    if stage not in {"train", "val"}:
        msg = f"stage must be 'train' or 'val', got {stage!r}"
        raise ValueError(msg)
    loaders = trainer.train_dataloader if stage == "train" else trainer.val_dataloaders
    transforms = [getattr(trainer.datamodule, f"{stage}_augmentations", None)]
    transforms += [getattr(loader.dataset, "augmentations", None) for loader in _dataloaders(loaders)]
    return [transform for transform in transforms if transform is not None]


def _dataloaders(loaders: Any) -> Iterable[DataLoader]:  # noqa: ANN401 - Lightning accepts nested collections
    """Yield every ``DataLoader`` in a (possibly nested) collection of them."""
    if isinstance(loaders, DataLoader):
        yield loaders
    elif isinstance(loaders, dict):
        for loader in loaders.values():
            yield from _dataloaders(loader)
    elif isinstance(loaders, list | tuple):
        for loader in loaders:
            yield from _dataloaders(loader)


def transforms_digest(transforms: Sequence[Any]) -> str:
    """Digest a list of transforms by their ``repr`` (which holds sizes, interpolation and normalisation statistics).

    Args:
        transforms (Sequence[Any]): Transforms, e.g. from :func:`stage_transforms`.

    Returns:
        str: A short hex digest.
    """
    return hashlib.sha256(repr([repr(transform) for transform in transforms]).encode()).hexdigest()[:16]


def feature_fingerprint(backbone: nn.Module, pooling: nn.Module, transforms: Sequence[Any], precision: str) -> str:
    """Digest everything besides the image that the cached features depend on.

    Args:
        backbone (nn.Module): The frozen feature extractor; its class, name and every weight and buffer are hashed,
            so a different checkpoint, ``weights_path`` or random initialisation gives a different fingerprint.
        pooling (nn.Module): The pooling applied to the backbone's outputs.
        transforms (Sequence[Any]): Pre-processing and dataset transforms, hashed by their ``repr`` (which holds
            sizes, interpolation and normalisation statistics).
        precision (str): The trainer's precision (autocast changes the features' values and dtype).

    Returns:
        str: A hex digest.
    """
    digest = hashlib.sha256()
    description = (type(backbone).__qualname__, getattr(backbone, "name", None), repr(pooling), precision)
    digest.update(repr((description, transforms_digest(transforms))).encode())
    for name, tensor in backbone.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """Per-image feature store with a CPU-memory budget and spill-over to disk.

    Args:
        max_memory_bytes (int, optional): Bytes of features kept in memory; entries beyond it are written to disk.
            ``0`` keeps everything on disk. Defaults to 2 GiB.
        spill_dir (str | Path | None, optional): Folder in which the cache creates its private temporary folder
            for spilled entries. ``None`` uses the system's temporary folder. Defaults to ``None``.

    Raises:
        ValueError: If ``max_memory_bytes`` is negative.

    Example:
        >>> cache = FeatureCache(max_memory_bytes=0)
        >>> cache.bind("fingerprint-of-backbone-and-transforms")
        False
        >>> images = torch.zeros(2, 3, 8, 8)
        >>> features = cache.features(["a.png", "b.png"], images, lambda x: [x.mean(dim=1, keepdim=True)])
        >>> cache.misses, len(cache), cache.disk_entries
        (2, 2, 2)
    """

    def __init__(self, max_memory_bytes: int = DEFAULT_CACHE_BYTES, spill_dir: str | Path | None = None) -> None:
        if max_memory_bytes < 0:
            msg = f"max_memory_bytes must be >= 0 (0 spills every entry to disk), got {max_memory_bytes}"
            raise ValueError(msg)
        self.max_memory_bytes = int(max_memory_bytes)
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        self._reset_state()

    def _reset_state(self) -> None:
        """Start empty, unbound, with zeroed statistics."""
        self.fingerprint: str | None = None
        self.hits = 0
        self.misses = 0
        self._memory: dict[str, tuple[torch.Tensor, ...]] = {}
        self._memory_bytes = 0
        self._disk: dict[str, Path] = {}
        self._files_written = 0  # names spill files; never reused, so a replaced entry cannot clobber another
        self._folder: Path | None = None
        self._remove_folder: weakref.finalize | None = None

    def __len__(self) -> int:
        """Return the number of cached images."""
        return len(self._memory) + len(self._disk)

    def __contains__(self, key: str) -> bool:
        """Tell whether ``key`` is cached (in memory or on disk)."""
        return key in self._memory or key in self._disk

    @property
    def memory_bytes(self) -> int:
        """Bytes of features held in memory."""
        return self._memory_bytes

    @property
    def disk_entries(self) -> int:
        """Number of entries spilled to disk."""
        return len(self._disk)

    def bind(self, fingerprint: str) -> bool:
        """Bind the cache to the features' fingerprint, emptying it if it held features of another one.

        Args:
            fingerprint (str): From :func:`feature_fingerprint`.

        Returns:
            bool: ``True`` if cached entries were dropped because the fingerprint changed.
        """
        stale = self.fingerprint is not None and self.fingerprint != fingerprint and len(self) > 0
        if self.fingerprint != fingerprint:
            self.clear()
        self.fingerprint = fingerprint
        return stale

    def clear(self) -> None:
        """Drop every entry and delete the spill folder; the fingerprint and statistics are kept."""
        self._memory.clear()
        self._memory_bytes = 0
        self._disk.clear()
        if self._remove_folder is not None:
            self._remove_folder()
        self._folder, self._remove_folder = None, None

    def put(self, key: str, features: Sequence[torch.Tensor]) -> None:
        """Store one image's features (one tensor per scale, without batch axis), replacing any earlier entry.

        Args:
            key (str): The image's key.
            features (Sequence[torch.Tensor]): Its features; they are copied to the CPU.
        """
        self._discard(key)
        entry = tuple(feature.detach().to("cpu", copy=True) for feature in features)
        size = sum(feature.numel() * feature.element_size() for feature in entry)
        if self._memory_bytes + size <= self.max_memory_bytes:
            self._memory[key] = entry
            self._memory_bytes += size
            return
        path = self._spill_folder() / f"{self._files_written}.pt"
        self._files_written += 1
        torch.save(entry, path)
        self._disk[key] = path

    def get(self, key: str) -> tuple[torch.Tensor, ...] | None:
        """Return one image's cached features (on the CPU), or ``None``; statistics are not updated.

        Args:
            key (str): The image's key.

        Returns:
            tuple[torch.Tensor, ...] | None: One tensor per scale, or ``None`` if ``key`` is not cached.
        """
        if key in self._memory:
            return self._memory[key]
        if key in self._disk:
            return tuple(torch.load(self._disk[key], map_location="cpu", weights_only=True))
        return None

    def features(
        self,
        keys: Sequence[str],
        images: torch.Tensor,
        extract: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    ) -> list[torch.Tensor]:
        """Return a batch's features, running ``extract`` only on the images not cached yet.

        A batch with no cached image goes through ``extract`` whole, so the first epoch computes exactly what an
        uncached run computes.

        Args:
            keys (Sequence[str]): One key per image.
            images (torch.Tensor): The pre-processed batch ``(B, 3, H, W)``.
            extract (Callable[[torch.Tensor], Sequence[torch.Tensor]]): Maps images to one batched feature
                tensor per scale.

        Returns:
            list[torch.Tensor]: One ``(B, C_i, h_i, w_i)`` tensor per scale, on ``images``' device.

        Raises:
            ValueError: If the number of keys differs from the batch size.
        """
        if len(keys) != images.shape[0]:
            msg = f"FeatureCache.features got {len(keys)} keys for a batch of {images.shape[0]} images; give one each"
            raise ValueError(msg)
        entries = [self.get(key) for key in keys]
        missing = [index for index, entry in enumerate(entries) if entry is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if len(missing) == len(keys):
            computed = list(extract(images))
            for index, key in enumerate(keys):
                self.put(key, [feature[index] for feature in computed])
            return computed
        if missing:
            computed = list(extract(images[missing]))
            for position, index in enumerate(missing):
                self.put(keys[index], [feature[position] for feature in computed])
                entries[index] = tuple(feature[position].cpu() for feature in computed)
        # Stacked on the CPU, so that a GPU batch costs one host-to-device copy per scale.
        return [torch.stack([entry[scale] for entry in entries]).to(images.device) for scale in range(len(entries[0]))]

    def _discard(self, key: str) -> None:
        """Remove ``key``'s entry if present (its spill file too)."""
        entry = self._memory.pop(key, None)
        if entry is not None:
            self._memory_bytes -= sum(feature.numel() * feature.element_size() for feature in entry)
        path = self._disk.pop(key, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def _spill_folder(self) -> Path:
        """Create the private spill folder on first use; it is removed by :meth:`clear` or at garbage collection."""
        if self._folder is None:
            if self.spill_dir is not None:
                self.spill_dir.mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix="gcaflow-features-", dir=self.spill_dir))
            self._remove_folder = weakref.finalize(self, shutil.rmtree, self._folder, ignore_errors=True)
        return self._folder

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the settings only: cached features are a per-process, per-run artefact.

        Returns:
            dict[str, Any]: The constructor arguments.
        """
        return {"max_memory_bytes": self.max_memory_bytes, "spill_dir": self.spill_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore an empty, unbound cache with the pickled settings.

        Args:
            state (dict[str, Any]): From :meth:`__getstate__`.
        """
        self.max_memory_bytes = state["max_memory_bytes"]
        self.spill_dir = state["spill_dir"]
        self._reset_state()


class CachedImagePlaceholders(Dataset):
    """A training data set that does not read the images whose features the cache already holds.

    Every training batch is first shown to :meth:`remember` (by the ``SkipCachedImageReads`` callback, in the
    training process, whichever process read the images). It keeps each image's item with the image, and a mask
    that is all zeros (a normal training image's), replaced by zero-strided zero tensors of the same shape and
    dtype: a few bytes per image. ``__getitem__`` returns that placeholder instead of reading the image when the
    cache holds the image's features, and reads it as ``dataset`` would otherwise.

    The placeholder is only ever returned for a cached image, so the model never sees its pixels; the check is
    made where the item is built, against the cache as that process sees it. Data-loader workers forked at the
    start of an epoch (PyTorch's default on Linux) see the training process's cache and placeholders, so they skip
    too; persistent or spawned workers see an empty cache and read every image, which is slower but correct.

    Args:
        dataset (Dataset): The training data set; items are anomalib dataclasses with an ``image_path``, and the
            set has a ``samples`` table with an ``image_path`` column (every ``AnomalibDataset`` has both).
        cache (FeatureCache): The cache the model serves features from, keyed by image path.

    Attributes that the wrapper does not define (``collate_fn``, ``augmentations``, ``samples``, ...) are the
    wrapped data set's, so data modules and loaders use the wrapper as they would the data set.
    """

    def __init__(self, dataset: Dataset, cache: FeatureCache) -> None:
        self.dataset = dataset
        self.cache = cache
        self.placeholders: dict[str, Any] = {}

    def __len__(self) -> int:
        """Return the wrapped data set's length."""
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:  # noqa: ANN401 - the wrapped data set's item type
        """Return the placeholder of a cached image, or read the item.

        Args:
            index (int): Position in the data set.

        Returns:
            Any: The item.
        """
        path = str(self.dataset.samples.image_path.iat[index])
        placeholder = self.placeholders.get(path)
        if placeholder is not None and path in self.cache:
            return placeholder
        return self.dataset[index]

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - any attribute of the wrapped data set
        """Forward other attributes to the wrapped data set.

        Args:
            name (str): Attribute name.

        Returns:
            Any: The wrapped data set's attribute.

        Raises:
            AttributeError: For ``dataset`` itself and dunder names, so that copying and unpickling (which look
                them up before ``__init__`` has run) do not recurse.
        """
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def remember(self, batch: Any) -> None:  # noqa: ANN401 - an anomalib batch
        """Keep a placeholder item, on the CPU, for every image of ``batch`` not seen before.

        Args:
            batch (Any): A collated training batch, before the pre-processor has transformed it.
        """
        new = [index for index, path in enumerate(batch.image_path) if str(path) not in self.placeholders]
        if not new:
            return
        items = batch.items
        for index in new:
            item = items[index]
            fields = {
                field.name: _placeholder(field.name, value)
                for field in dataclasses.fields(item)
                if isinstance(value := getattr(item, field.name), torch.Tensor)
            }
            self.placeholders[str(item.image_path)] = dataclasses.replace(item, **fields)


def _placeholder(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A CPU stand-in for one tensor field of a training item that shares no memory with its batch.

    The image, and a mask that is all zeros, become zero tensors of their shape, dtype and type that store one
    element; any other tensor (the label, a mask with defects) becomes a CPU copy.
    """
    if name == "image" or (name == "gt_mask" and not tensor.any()):
        return torch.zeros((), dtype=tensor.dtype).expand(tensor.shape).as_subclass(type(tensor))
    return tensor.detach().to("cpu", copy=True)
