"""Lightning callbacks that keep a long anomalib run from being lost, corrupted or mis-scored.

* :class:`SkipCachedImageReads` stops reading training images whose backbone features are already cached.
* :class:`DataCheck` reads every data file before the first epoch and rejects non-finite input batches.
* :class:`LastEpochCheckpoint` saves every finished epoch, with the random-number state, to one stable file, and
  stops at the first non-finite loss so that this file always holds the last good epoch.
* :class:`DistributedEvaluation` makes multi-process validation and test count every image exactly once.

:func:`anomalib_gcaflow.toolkit.training_callbacks` returns all four in the order they must run; GCAFlow's
``configure_callbacks`` calls it, and any other model gets them with ``Engine(callbacks=training_callbacks())``.
They work with anomalib's ``Engine``, its CLI and a plain Lightning ``Trainer`` alike.
"""

import logging
import random
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib.data import AnomalibDataModule, AnomalibDataset, PredictDataset
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, SequentialSampler
from torchmetrics import Metric

from anomalib_gcaflow.toolkit.data_checks import (
    check_datasets,
    check_finite_images,
    check_image_files,
    explain_setup_failure,
)
from anomalib_gcaflow.toolkit.feature_cache import CachedImagePlaceholders

logger = logging.getLogger(__name__)

# The splits each Lightning stage reads (see DataCheck).
SPLITS_BY_STAGE = {"fit": ("train", "val", "test"), "validate": ("val",), "test": ("test",)}


class SkipCachedImageReads(Callback):
    """Serve training images whose features the model has cached as placeholders instead of reading them again.

    At ``setup("fit")`` the data module's training set is wrapped in
    :class:`~anomalib_gcaflow.toolkit.feature_cache.CachedImagePlaceholders` (the data module has been set up by
    then, its training loader is not built yet); every training batch is shown to it before the pre-processor
    changes the batch (this callback must come before the model's pre-processor), and ``teardown`` gives the data
    module its own training set back. Models without a ``feature_cache`` and data that does not come from an
    anomalib data module are left alone.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Wrap the training set for ``fit`` when the model caches features.

        Args:
            trainer (Trainer): The trainer.
            pl_module (LightningModule): The model; its ``feature_cache`` (if any) decides what is skipped.
            stage (str): ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``.
        """
        cache = getattr(pl_module, "feature_cache", None)
        datamodule = trainer.datamodule
        train_data = getattr(datamodule, "train_data", None)
        if stage == TrainerFn.FITTING and cache is not None and isinstance(train_data, AnomalibDataset):
            datamodule.train_data = CachedImagePlaceholders(train_data, cache)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:  # noqa: ANN401
        """Keep a placeholder for every training image not seen before.

        Args:
            trainer (Trainer): The trainer.
            pl_module (LightningModule): The model (unused).
            batch (Any): The batch, not yet pre-processed.
            batch_idx (int): Its index (unused).
        """
        del pl_module, batch_idx
        train_data = getattr(trainer.datamodule, "train_data", None)
        if isinstance(train_data, CachedImagePlaceholders):
            train_data.remember(batch)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Give the data module its own training set back.

        Args:
            trainer (Trainer): The trainer.
            pl_module (LightningModule): The model (unused).
            stage (str): The stage (unused).
        """
        del pl_module, stage
        train_data = getattr(trainer.datamodule, "train_data", None)
        if isinstance(train_data, CachedImagePlaceholders):
            trainer.datamodule.train_data = train_data.dataset


class DataCheck(Callback):
    """Check the data before the first epoch, and every batch for NaN or infinite pixels.

    At ``setup`` (after anomalib has set the data module up) every image and mask of the stage's splits is read
    with :func:`~anomalib_gcaflow.toolkit.data_checks.check_datasets`; fitting reads the test split too, so that a bad
    test image stops the run before training rather than after it. ``predict`` reads its data loaders' files at
    ``on_predict_start``, before the first batch. If anomalib's own ``prepare_data`` or
    ``setup`` of the data module fails first, the cause found on disk (wrong root or category, broken links,
    anomalous images without masks) is attached to anomalib's error as a note.
    """

    def __init__(self) -> None:
        self._data_module_ready = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Read every file of the splits that ``stage`` uses.

        Args:
            trainer (Trainer): The trainer.
            pl_module (LightningModule): The model (unused).
            stage (str): ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``.

        Raises:
            ValueError: If a file is unusable (see :func:`~anomalib_gcaflow.toolkit.data_checks.check_datasets`).
        """
        del pl_module
        self._data_module_ready = True
        datamodule = trainer.datamodule
        if not isinstance(datamodule, AnomalibDataModule):
            return  # plain data loaders or other data modules: nothing known to read
        datasets = {
            split: getattr(datamodule, f"{split}_data")
            for split in SPLITS_BY_STAGE.get(stage, ())
            if hasattr(datamodule, f"{split}_data")
        }
        check_datasets(datasets)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Read every file that ``predict`` will use, whether it came from a data module or a plain folder.

        Prediction data often arrives as data loaders (``anomalib predict --data <folder>`` wraps the folder in a
        ``PredictDataset``), not as a data module, so the files are taken from the data loaders, which Lightning
        has built by now.

        Args:
            trainer (Trainer): The trainer.
            pl_module (LightningModule): The model (unused).

        Raises:
            ValueError: If a file is unusable (see :mod:`~anomalib_gcaflow.toolkit.data_checks`).
        """
        del pl_module
        loaders = trainer.predict_dataloaders
        for loader in CombinedLoader(loaders).flattened if loaders is not None else ():
            dataset = getattr(loader, "dataset", None)
            if isinstance(dataset, AnomalibDataset):
                check_datasets({"predict": dataset})
            elif isinstance(dataset, PredictDataset):
                check_image_files(dataset.image_filenames)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Explain an error raised by anomalib while it prepared or set up the data module.

        Args:
            trainer (Trainer): The trainer.
            pl_module (LightningModule): The model (unused).
            exception (BaseException): The error; the explanation is added to it as a note.
        """
        del pl_module
        if self._data_module_ready or not isinstance(trainer.datamodule, AnomalibDataModule):
            return
        explanation = explain_setup_failure(trainer.datamodule)
        if explanation is None:
            return
        message = f"GCAFlow data check: {explanation}"
        if hasattr(exception, "add_note"):
            exception.add_note(message)
        else:  # Python 3.10 has no exception notes
            logger.error(message)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:  # noqa: ANN401
        """Reject a training batch with non-finite pixels.

        Args:
            trainer (Trainer): The trainer (unused).
            pl_module (LightningModule): The model (unused).
            batch (Any): The batch.
            batch_idx (int): Its index (unused).
        """
        del trainer, pl_module, batch_idx
        check_finite_images(batch)

    def on_validation_batch_start(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Any,  # noqa: ANN401
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Reject a validation, test or prediction batch with non-finite pixels.

        Args:
            trainer (Trainer): The trainer (unused).
            pl_module (LightningModule): The model (unused).
            batch (Any): The batch.
            batch_idx (int): Its index (unused).
            dataloader_idx (int, optional): Its data loader (unused). Defaults to 0.
        """
        del trainer, pl_module, batch_idx, dataloader_idx
        check_finite_images(batch)

    # Evaluation and prediction batches get the same check through one hook.
    on_test_batch_start = on_validation_batch_start
    on_predict_batch_start = on_validation_batch_start


class LastEpochCheckpoint(Callback):
    """Save every finished training epoch to one stable file, so that no failure costs more than one epoch.

    After each training epoch the whole training state (weights, optimiser, LR scheduler, loop progress, and the
    Python, NumPy and torch random-number states) is written to a temporary file that then atomically replaces
    ``<dirpath>/last.ckpt``. An exception or Ctrl-C during an epoch leaves the previous epoch's file untouched;
    ``--ckpt_path <dirpath>/last.ckpt`` (``ckpt_path=`` of ``fit``) resumes from it, and because the random-number
    states are restored too, the shuffled batches of the remaining epochs, and so the final weights, are those of
    an uninterrupted run.

    A non-finite loss stops training at once (before the step is applied), and weights that became non-finite
    are never saved: the file always holds the last good epoch. Nothing is saved when the trainer has
    checkpointing disabled or runs ``fast_dev_run``.

    Args:
        dirpath (str | Path | None, optional): Folder of the file. Defaults to ``None``:
            ``<trainer.default_root_dir>/weights/lightning``, beside anomalib's ``model.ckpt``.
        filename (str, optional): File name. Defaults to ``"last.ckpt"``.
    """

    def __init__(self, dirpath: str | Path | None = None, filename: str = "last.ckpt") -> None:
        self.dirpath = dirpath
        self.filename = filename

    def path(self, trainer: Trainer) -> Path:
        """Return the checkpoint file this callback writes for ``trainer``.

        Args:
            trainer (Trainer): The trainer.

        Returns:
            Path: ``<dirpath>/<filename>``.
        """
        if self.dirpath is not None:
            return Path(self.dirpath) / self.filename
        return Path(trainer.default_root_dir) / "weights" / "lightning" / self.filename

    def state_dict(self) -> dict[str, Any]:
        """Capture the random-number states into every checkpoint the trainer writes.

        Returns:
            dict[str, Any]: ``{"rng_states": ...}``.
        """
        return {"rng_states": collect_rng_states()}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Restore a resumed checkpoint's random-number states, before the first resumed epoch shuffles its data.

        Only when fitting: evaluating a checkpoint leaves the random-number states alone.

        Args:
            trainer (Trainer): The trainer.
            pl_module (LightningModule): The model (unused).
            checkpoint (dict[str, Any]): The checkpoint being restored.
        """
        del pl_module
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is not None and trainer.state.fn == TrainerFn.FITTING:
            restore_rng_states(state["rng_states"])

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        """Stop before a non-finite loss reaches the weights.

        Args:
            trainer (Trainer): The trainer.
            pl_module (LightningModule): The model (unused).
            loss (torch.Tensor): The loss about to be back-propagated.

        Raises:
            FloatingPointError: If the loss is NaN or infinite (in any process).
        """
        del pl_module
        finite = bool(torch.isfinite(loss).all())
        if trainer.world_size > 1:
            # Every process must stop together, or the others wait forever in the next gradient all-reduce.
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            msg = (
                f"The training loss is not finite (epoch {trainer.current_epoch}, step {trainer.global_step}); the "
                f"step was not applied. {self._resume_hint(trainer)}"
            )
            raise FloatingPointError(msg)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Save the finished epoch: write a temporary file, then atomically put it in place of the last one.

        Args:
            trainer (Trainer): The trainer.
            pl_module (LightningModule): The model.

        Raises:
            FloatingPointError: If a trainable weight is NaN or infinite; the last good file is kept.
        """
        if trainer.fast_dev_run or trainer.checkpoint_callback is None:
            return
        corrupt = [name for name, p in pl_module.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if corrupt:
            msg = (
                f"{len(corrupt)} weight tensor(s) became non-finite in epoch {trainer.current_epoch} (e.g. "
                f"{corrupt[0]}); they were not saved. {self._resume_hint(trainer)}"
            )
            raise FloatingPointError(msg)
        path = self.path(trainer)
        temporary = self._temporary_path(trainer)
        trainer.save_checkpoint(temporary)
        if trainer.is_global_zero:
            temporary.replace(path)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Remove a half-written temporary file; the last complete checkpoint stays as it is.

        Args:
            trainer (Trainer): The trainer.
            pl_module (LightningModule): The model (unused).
            exception (BaseException): The error (unused).
        """
        del pl_module, exception
        if trainer.is_global_zero:
            self._temporary_path(trainer).unlink(missing_ok=True)

    def _temporary_path(self, trainer: Trainer) -> Path:
        """Return the temporary file, beside the final one so that replacing it is atomic."""
        path = self.path(trainer)
        return path.with_name(f".{path.name}.tmp")

    def _resume_hint(self, trainer: Trainer) -> str:
        """Say where the last good epoch is and how to go on from it."""
        path = self.path(trainer)
        if not path.is_file():
            return "No epoch had finished yet; lower the learning rate (lr) or check the inputs."
        return f"The last good epoch is in {path}: resume from it (--ckpt_path) with a lower learning rate (lr)."


def collect_rng_states() -> dict[str, Any]:
    """Return the Python, NumPy and torch random-number states, as tensors and plain values.

    Plain values keep checkpoints loadable with ``torch.load(weights_only=True)``.

    Returns:
        dict[str, Any]: The states, for :func:`restore_rng_states`.
    """
    # The legacy global NumPy generator: the one libraries draw from when a user never made a Generator.
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()  # noqa: NPY002
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the random-number states captured by :func:`collect_rng_states`.

    Args:
        states (dict[str, Any]): The captured states.
    """
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))  # noqa: NPY002
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class DistributedEvaluation(Callback):
    """Make multi-process (DDP) validation and test count every image exactly once.

    Two things count images twice without it:

    * Lightning's default ``DistributedSampler`` pads an evaluation set whose size does not divide by the number
      of processes with repeats of its first images. Here each process takes every ``world_size``-th image
      instead, without padding; the metrics gather the shares from all processes.
    * ``strategy="ddp_spawn"`` on CPU hands every process the same shared-memory tensors; Lightning un-shares
      parameters and buffers, but not torchmetrics states, so each process adds its counts into the others'
      (seen: 7 images counted as 14). Every metric is reset to fresh, process-local states here.

    Only data from an anomalib data module is re-sampled; a single process is left as it is.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Give the metrics process-local states and wrap the data module's evaluation data loaders.

        Args:
            trainer (Trainer): The trainer.
            pl_module (LightningModule): The model, whose metrics (evaluator, post-processor) are reset.
            stage (str): The stage (unused; every evaluation loader is wrapped once).
        """
        del stage
        if trainer.world_size < 2:
            return
        for module in pl_module.modules():
            if isinstance(module, Metric):
                module.reset()
        datamodule = trainer.datamodule
        if not isinstance(datamodule, AnomalibDataModule):
            return
        for hook in ("val_dataloader", "test_dataloader"):
            make_loader = getattr(datamodule, hook)
            if isinstance(make_loader, partial) and make_loader.func is _unpadded_loader:
                continue  # wrapped at an earlier stage of this run
            setattr(datamodule, hook, partial(_unpadded_loader, make_loader, trainer.world_size, trainer.global_rank))


class ShardSampler(DistributedSampler):
    """Every ``num_replicas``-th index from ``rank`` on, in order, with no padding (shares may differ by one).

    A ``DistributedSampler`` subclass, so Lightning keeps it instead of putting its padding sampler in its place.

    Args:
        dataset (Any): The data set (anything with a length).
        num_replicas (int): Number of processes.
        rank (int): This process's rank.
    """

    def __init__(self, dataset: Any, num_replicas: int, rank: int) -> None:  # noqa: ANN401
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.indices = range(rank, len(dataset), num_replicas)

    def __iter__(self):  # noqa: ANN204
        """Iterate over this process's indices."""
        return iter(self.indices)

    def __len__(self) -> int:
        """Return the number of indices of this process."""
        return len(self.indices)


def _unpadded_loader(make_loader: Any, num_replicas: int, rank: int) -> Any:  # noqa: ANN401
    """Call a data module's loader hook and give the plain, in-order loaders it returns a :class:`ShardSampler`."""
    loader = make_loader()
    if not (
        type(loader) is DataLoader
        and type(loader.batch_sampler) is BatchSampler
        and isinstance(loader.sampler, SequentialSampler)
    ):
        # Anything else (shuffled, custom sampler, iterable data set) keeps Lightning's default handling.
        return loader
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=ShardSampler(loader.dataset, num_replicas, rank),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers,
    )
