"""Training feature cache: hits, misses, spill to disk, invalidation, and the same weights with it.

Also: off under random augmentation, and cached images not read again.
"""

import logging
import pickle
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from anomalib.data import Folder
from anomalib.data.datasets.base import image as anomalib_image_dataset
from lightning.pytorch import Callback, Trainer, seed_everything
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from anomalib_gcaflow import GCAFlow
from anomalib_gcaflow.toolkit.feature_cache import (
    CachedImagePlaceholders,
    FeatureCache,
    feature_fingerprint,
    is_deterministic,
)

IMAGE_SIZE = (64, 64)


class _CountingExtractor:
    """A stand-in backbone that records how many images it was asked to process."""

    def __init__(self) -> None:
        self.images_seen = 0

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        self.images_seen += images.shape[0]
        return [images.mean(dim=1, keepdim=True), images[:, :2, ::2, ::2] * 2]


def _images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_hits_serve_the_stored_features_and_only_misses_are_extracted() -> None:
    cache, extract = FeatureCache(), _CountingExtractor()
    cache.bind("fingerprint")
    images = _images(4)
    first = cache.features(["a", "b", "c", "d"], images, extract)
    assert (extract.images_seen, cache.hits, cache.misses, len(cache)) == (4, 0, 4, 4)

    # Reordered batch with one new image: only the new one reaches the extractor.
    new_image = _images(1, seed=1)
    batch = torch.cat([images[2:3], new_image, images[0:1]])
    second = cache.features(["c", "e", "a"], batch, extract)
    assert (extract.images_seen, cache.hits, cache.misses, len(cache)) == (5, 2, 5, 5)
    for scale in range(2):
        assert torch.equal(second[scale][0], first[scale][2])
        assert torch.equal(second[scale][2], first[scale][0])
        assert torch.equal(second[scale][1], extract(new_image)[scale][0])


def test_entries_are_copies_that_do_not_keep_the_batch_alive() -> None:
    cache = FeatureCache()
    batch_feature = torch.zeros(4, 2, 3, 3)
    cache.put("a", [batch_feature[1]])
    batch_feature.fill_(1.0)
    assert torch.equal(cache.get("a")[0], torch.zeros(2, 3, 3))
    assert cache.memory_bytes == 2 * 3 * 3 * 4  # one image, not the whole batch's storage


def test_entries_beyond_the_memory_budget_spill_to_disk_and_clear_deletes_them(tmp_path: Path) -> None:
    one_image_bytes = (1 * 8 * 8 + 2 * 4 * 4) * 4
    cache, extract = FeatureCache(max_memory_bytes=2 * one_image_bytes, spill_dir=tmp_path), _CountingExtractor()
    cache.bind("fingerprint")
    images = _images(5)
    first = cache.features(list("abcde"), images, extract)
    assert (cache.memory_bytes, cache.disk_entries, len(cache)) == (2 * one_image_bytes, 3, 5)
    spill_files = list(tmp_path.rglob("*.pt"))
    assert len(spill_files) == 3

    again = cache.features(list("edcba"), images.flip(0), extract)
    assert extract.images_seen == 5  # every image, including the spilled ones, came from the cache
    for scale in range(2):
        assert torch.equal(again[scale], first[scale].flip(0))

    # Replacing a spilled entry must not overwrite another entry's file.
    cache.put("c", [torch.full((1, 8, 8), 7.0), torch.zeros(2, 4, 4)])
    assert torch.equal(cache.get("d")[0], first[0][3])
    assert torch.equal(cache.get("e")[0], first[0][4])
    assert torch.equal(cache.get("c")[0], torch.full((1, 8, 8), 7.0))

    cache.clear()
    assert len(cache) == 0
    assert not any(path.exists() for path in spill_files)


def test_a_new_fingerprint_empties_the_cache() -> None:
    cache, extract = FeatureCache(max_memory_bytes=0), _CountingExtractor()
    assert not cache.bind("backbone-1")
    cache.features(["a"], _images(1), extract)
    assert not cache.bind("backbone-1")
    assert "a" in cache
    assert cache.bind("backbone-2")
    assert len(cache) == 0
    cache.features(["a"], _images(1), extract)
    assert extract.images_seen == 2


def test_fingerprint_follows_weights_pooling_transforms_and_precision() -> None:
    torch.manual_seed(0)
    backbone, pool = nn.Conv2d(3, 4, 3), nn.AvgPool2d(3, 2, 1)
    transforms = [v2.Compose([v2.Resize((64, 64)), v2.Normalize([0.5] * 3, [0.5] * 3)])]
    reference = feature_fingerprint(backbone, pool, transforms, "32-true")
    assert feature_fingerprint(backbone, pool, transforms, "32-true") == reference
    assert feature_fingerprint(backbone, pool, [v2.Resize((128, 128))], "32-true") != reference
    assert feature_fingerprint(backbone, nn.AvgPool2d(2), transforms, "32-true") != reference
    assert feature_fingerprint(backbone, pool, transforms, "bf16-mixed") != reference
    with torch.no_grad():
        backbone.weight[0, 0, 0, 0] += 1e-6
    assert feature_fingerprint(backbone, pool, transforms, "32-true") != reference


def test_pickling_keeps_the_settings_and_drops_the_features(tmp_path: Path) -> None:
    cache = FeatureCache(max_memory_bytes=100, spill_dir=tmp_path)
    cache.bind("fingerprint")
    cache.features(list("abc"), _images(3), _CountingExtractor())
    restored = pickle.loads(pickle.dumps(cache))
    assert (restored.max_memory_bytes, restored.spill_dir, len(restored), restored.fingerprint) == (
        100,
        tmp_path,
        0,
        None,
    )
    assert len(cache) == 3


def test_random_transforms_are_recognised() -> None:
    deterministic = v2.Compose([v2.Resize((64, 64)), v2.ToDtype(torch.float32), v2.Normalize([0.5] * 3, [0.5] * 3)])
    assert is_deterministic(None)
    assert is_deterministic(deterministic)
    assert not is_deterministic(v2.RandomHorizontalFlip())
    assert not is_deterministic(v2.Compose([v2.Resize((64, 64)), v2.ColorJitter(0.1)]))
    assert not is_deterministic(v2.Lambda(lambda x: x))  # unknown: assumed random


def test_negative_budget_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_memory_bytes must be >= 0"):
        FeatureCache(max_memory_bytes=-1)


# --- wired into GCAFlow ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def noise_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten normal and two abnormal 48x48 RGB images."""
    root = tmp_path_factory.mktemp("noise_folder")
    rng = np.random.default_rng(0)
    for folder, count in (("good", 10), ("bad", 2)):
        (root / folder).mkdir()
        for index in range(count):
            pixels = rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / f"{index:03d}.png")
    return root


def _fit(
    root: Path,
    cache_features: bool,
    train_augmentations: v2.Transform | None = None,
    num_workers: int = 0,
    callbacks: list[Callback] | None = None,
) -> tuple[GCAFlow, dict[str, torch.Tensor], Folder]:
    """Train a tiny GCAFlow for two epochs; return it with its flow's initial weights and the data module.

    With ``callbacks``, it also validates after each epoch (and runs Lightning's sanity check first).
    """
    seed_everything(0)
    model = GCAFlow(
        backbone="tf_efficientnet_lite0",
        pre_trained=False,
        image_size=IMAGE_SIZE,
        depths=(1, 1, 1),
        kernel_size=3,
        expansion=1,
        pos_embed_dim=8,
        lr=1e-3,
        warmup_epochs=0,
        max_epochs=2,
        cache_features=cache_features,
        evaluator=False,
        post_processor=False,
        visualizer=False,
    )
    datamodule = Folder(
        name="tiny",
        root=root,
        normal_dir="good",
        abnormal_dir="bad",
        train_batch_size=3,  # batches of 3, 3, 2 in a new order each epoch
        eval_batch_size=4,
        num_workers=num_workers,
        train_augmentations=train_augmentations,
        seed=0,
    )
    initial = {name: tensor.clone() for name, tensor in model.model.flow.state_dict().items()}
    trainer = Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=None if callbacks else 0,
        num_sanity_val_steps=None if callbacks else 0,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=datamodule)
    return model, initial, datamodule


def test_a_pickled_model_carries_no_cached_features() -> None:
    model = GCAFlow(backbone="tf_efficientnet_lite0", pre_trained=False, image_size=IMAGE_SIZE, depths=(1, 1, 1))
    model.feature_cache.bind("fingerprint")
    model.feature_cache.put("image.png", [torch.ones(4, 2, 2)])
    restored = pickle.loads(pickle.dumps(model))  # what `export --export_type torch` and DDP spawn do
    assert len(restored.feature_cache) == 0
    assert restored.feature_cache.max_memory_bytes == model.feature_cache.max_memory_bytes
    assert not any("feature_cache" in key for key in model.state_dict())


def test_same_seed_gives_the_same_weights_with_and_without_the_cache(noise_folder: Path) -> None:
    cached, initial, _ = _fit(noise_folder, cache_features=True)
    uncached, _, _ = _fit(noise_folder, cache_features=False)
    # 8 training images (Folder moves 2 normal ones to the test split): epoch 1 fills the cache, epoch 2 hits.
    assert (cached.feature_cache.misses, cached.feature_cache.hits) == (8, 8)
    assert len(cached.feature_cache) == 0  # freed when training ends
    cached_state, uncached_state = cached.model.flow.state_dict(), uncached.model.flow.state_dict()
    for name, tensor in cached_state.items():
        assert torch.equal(tensor, uncached_state[name]), name
    assert any(not torch.equal(tensor, initial[name]) for name, tensor in cached_state.items())  # it did train


class _ValidationOutputs(Callback):
    """Keep every validation batch's scores and maps, per epoch."""

    def __init__(self) -> None:
        self.outputs: list[tuple[bool, torch.Tensor, torch.Tensor]] = []

    def on_validation_batch_end(self, trainer: Trainer, pl_module: GCAFlow, outputs: Any, *args: object) -> None:
        del pl_module, args
        self.outputs.append((trainer.sanity_checking, outputs.pred_score.clone(), outputs.anomaly_map.clone()))


def test_validation_features_are_cached_within_a_fit_and_validation_is_unchanged(noise_folder: Path) -> None:
    cached_outputs, uncached_outputs = _ValidationOutputs(), _ValidationOutputs()
    cached, _, datamodule = _fit(noise_folder, cache_features=True, callbacks=[cached_outputs])
    _fit(noise_folder, cache_features=False, callbacks=[uncached_outputs])
    validation_images = len(datamodule.val_data)
    assert validation_images > 0
    # Training: 8 misses then 8 hits; validation: the sanity check runs uncached, epoch 1 fills, epoch 2 hits.
    assert (cached.feature_cache.misses, cached.feature_cache.hits) == (8 + validation_images, 8 + validation_images)
    assert len(cached.feature_cache) == 0
    assert [sanity for sanity, _, _ in cached_outputs.outputs] == [sanity for sanity, _, _ in uncached_outputs.outputs]
    assert sum(not sanity for sanity, _, _ in cached_outputs.outputs) == 2  # one batch per epoch
    for (_, score, anomaly_map), (_, reference_score, reference_map) in zip(
        cached_outputs.outputs, uncached_outputs.outputs, strict=True
    ):
        assert torch.equal(score, reference_score)
        assert torch.equal(anomaly_map, reference_map)


def test_cache_is_off_when_training_augmentations_are_random(
    noise_folder: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="anomalib_gcaflow.model.lightning_model"):
        model, _, _ = _fit(noise_folder, cache_features=True, train_augmentations=v2.RandomHorizontalFlip())
    assert (model.feature_cache.hits, model.feature_cache.misses) == (0, 0)
    assert any("feature cache off" in record.getMessage() for record in caplog.records)


def _count_reads(monkeypatch: pytest.MonkeyPatch, log: Path) -> None:
    """Make anomalib's data sets append every image path they read to ``log``, from any process."""
    read_image = anomalib_image_dataset.read_image

    def logging_read_image(path: str, *args: object, **kwargs: object) -> torch.Tensor:
        with log.open("a") as file:  # one short append per read: safe across forked workers
            file.write(f"{path}\n")
        return read_image(path, *args, **kwargs)

    monkeypatch.setattr(anomalib_image_dataset, "read_image", logging_read_image)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_cached_images_are_read_once_and_the_data_module_gets_its_training_set_back(
    noise_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    num_workers: int,
) -> None:
    log = tmp_path / "reads.txt"
    _count_reads(monkeypatch, log)
    model, _, datamodule = _fit(noise_folder, cache_features=True, num_workers=num_workers)
    training_images = [str(path) for path in datamodule.train_data.samples.image_path]
    assert len(training_images) == 8
    reads = Counter(log.read_text().splitlines())
    # Two epochs, one read each: the second epoch was served from the cache without opening a file, also by
    # data-loader workers forked at its start.
    assert {path: reads[path] for path in training_images} == dict.fromkeys(training_images, 1)
    assert model.feature_cache.hits == 8
    assert not isinstance(datamodule.train_data, CachedImagePlaceholders)


def test_forked_workers_give_the_same_weights(noise_folder: Path) -> None:
    in_process, _, _ = _fit(noise_folder, cache_features=True)
    with_workers, _, _ = _fit(noise_folder, cache_features=True, num_workers=2)
    for name, tensor in in_process.model.flow.state_dict().items():
        assert torch.equal(tensor, with_workers.model.flow.state_dict()[name]), name


def test_placeholders_store_one_element_and_never_stand_in_for_an_uncached_image(noise_folder: Path) -> None:
    datamodule = Folder(name="tiny", root=noise_folder, normal_dir="good", abnormal_dir="bad", num_workers=0, seed=0)
    datamodule.setup("fit")
    dataset = datamodule.train_data
    cache = FeatureCache()
    skipping = CachedImagePlaceholders(dataset, cache)
    assert skipping.collate_fn == dataset.collate_fn  # other attributes are the data set's
    batch = dataset.collate_fn([dataset[0], dataset[1]])
    skipping.remember(batch)
    path = str(dataset.samples.image_path.iat[0])
    placeholder = skipping.placeholders[path]
    assert placeholder.image.shape == dataset[0].image.shape
    assert placeholder.image.untyped_storage().nbytes() == placeholder.image.element_size()
    assert torch.equal(skipping[0].image, dataset[0].image)  # remembered but not cached: read
    cache.put(path, [torch.zeros(1)])
    assert skipping[0] is placeholder
    assert torch.equal(skipping[1].image, dataset[1].image)
    # What a spawned worker gets: the settings without the cached entries, so it reads every image.
    restored = pickle.loads(pickle.dumps(skipping))
    assert torch.equal(restored[0].image, dataset[0].image)
