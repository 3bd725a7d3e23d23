"""Clocks of the benchmarks: process CPU seconds, per-epoch training wall-clock, and a pausable training clock."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from anomalib.models.components import AnomalibModule
from lightning.pytorch import Callback, Trainer


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so that a clock read after it includes it.

    Args:
        device: The device measured; nothing happens for the CPU.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def cpu_seconds() -> float:
    """User plus system CPU time of this process and of its terminated children (data-loader workers).

    Returns:
        float: Seconds.
    """
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class EpochTimer(Callback):
    """Seconds from each training epoch's start to its last batch's end (GPU work included).

    Validation, which Lightning runs inside the epoch after its last batch, is left out.

    Args:
        device: ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.epoch_seconds: list[float] = []
        self._start = self._last = 0.0

    def _now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: AnomalibModule) -> None:
        """Start the epoch's clock.

        Args:
            trainer: The trainer.
            pl_module: The model.
        """
        del trainer, pl_module
        self._start = self._last = self._now()

    def on_train_batch_end(self, trainer: Trainer, pl_module: AnomalibModule, *args: object) -> None:
        """Remember when the latest batch finished.

        Args:
            trainer: The trainer.
            pl_module: The model.
            *args: The batch's outputs, the batch and its index (unused).
        """
        del trainer, pl_module, args
        self._last = self._now()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: AnomalibModule) -> None:
        """Record the epoch's seconds up to its last batch.

        Args:
            trainer: The trainer.
            pl_module: The model.
        """
        del trainer, pl_module
        self.epoch_seconds.append(self._last - self._start)


class TrainingClock(Callback):
    """Cumulative wall-clock and CPU seconds of a fit, without validation and without what runs under :meth:`paused`.

    The clock starts when training starts and runs through everything a training epoch costs (batches, optimiser
    and scheduler steps, callbacks, data-loader start-up, and a memory-bank model's fit, which anomalib runs when
    validation starts); Lightning's validation epochs and the intervals under :meth:`paused` (the benchmarks' own
    evaluations) are excluded. CPU seconds include finished data-loader workers.

    Args:
        device: ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self._wall = self._cpu = 0.0
        self._since: tuple[float, float] | None = None

    def _read(self) -> tuple[float, float]:
        synchronize(self.device)
        return time.perf_counter(), cpu_seconds()

    def _stop(self) -> None:
        if self._since is not None:
            wall, cpu = self._read()
            self._wall += wall - self._since[0]
            self._cpu += cpu - self._since[1]
            self._since = None

    def _start(self) -> None:
        if self._since is None:
            self._since = self._read()

    def elapsed(self) -> tuple[float, float]:
        """Training seconds so far.

        Returns:
            tuple[float, float]: Wall-clock and CPU seconds.
        """
        if self._since is None:
            return self._wall, self._cpu
        wall, cpu = self._read()
        return self._wall + wall - self._since[0], self._cpu + cpu - self._since[1]

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stop the clock for the duration of the block (no-op when it is not running).

        Yields:
            None: Control to the block.
        """
        running = self._since is not None
        self._stop()
        try:
            yield
        finally:
            if running:
                self._start()

    def on_train_start(self, trainer: Trainer, pl_module: AnomalibModule) -> None:
        """Start the clock.

        Args:
            trainer: The trainer.
            pl_module: The model.
        """
        del trainer, pl_module
        self._start()

    def on_train_end(self, trainer: Trainer, pl_module: AnomalibModule) -> None:
        """Stop the clock.

        Args:
            trainer: The trainer.
            pl_module: The model.
        """
        del trainer, pl_module
        self._stop()

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: AnomalibModule) -> None:
        """Pause during validation (anomalib's thresholds and normalisation, not training).

        Not at ``on_validation_start``: anomalib's memory-bank models (PatchCore's coreset selection, PaDiM's
        Gaussian fit) fit in their own ``on_validation_start``, which Lightning calls after the callbacks' one.
        That fit is their training, and the clock keeps running through it.

        Args:
            trainer: The trainer.
            pl_module: The model.
        """
        del trainer, pl_module
        self._stop()

    def on_validation_end(self, trainer: Trainer, pl_module: AnomalibModule) -> None:
        """Resume after a validation that interrupted training.

        Args:
            trainer: The trainer.
            pl_module: The model.
        """
        del pl_module
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._start()


def measure_seconds(
    function: Callable[[], object],
    repeats: int,
    warmup: int,
    device: torch.device | str,
) -> list[float]:
    """Time ``repeats`` calls after ``warmup`` untimed ones, GPU work included.

    Args:
        function (Callable[[], object]): What to time.
        repeats (int): Timed calls.
        warmup (int): Untimed calls first.
        device (torch.device | str): Device to synchronise.

    Returns:
        list[float]: Seconds of each timed call.
    """
    for _ in range(warmup):
        function()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds
