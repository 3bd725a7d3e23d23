"""Keep freed memory inside the process, so that tensors allocated in every training step stop page-faulting.

glibc's ``malloc`` serves large requests (from 128 KiB, a threshold it raises up to 32 MiB as it goes) with fresh
``mmap`` regions and returns them to the kernel on ``free``; it also trims the top of its heap once more than twice
that threshold is free. A CPU training step allocates its activations anew every step, so every step the kernel
hands the same memory back page by page, zeroing each 4 KiB page on its first touch: 1,600-4,500 page faults per
step of GCAFlow's flow alone (Lite0 features, batch 16), about 150 with both thresholds at 1 GiB, at the same peak
RSS (1.37 GB). Measured on 2 cores of an AMD EPYC (``benchmarks/results/speed_allocator/``, one run per setting):
epochs that run the backbone gain most, GCAFlow's first epoch 17.1 -> 13.3 s, GCAFlow without its feature cache
14.8 -> 10.7 s, Fastflow 17.7 -> 12.6 s; epochs that only run GCAFlow's flow on cached features did not change
beyond this machine's run-to-run noise (interleaved repeats: medians 7.2 against 7.5 s). The quick start's
``anomalib train`` took 104 s with it and 120 s without, with identical AUROCs.

What it costs: the process's memory no longer shrinks after a peak (it is reused, not returned), which is what a
training or test process wants and a long-lived server with one large peak may not. The setting is process-wide
and stays until the process exits; worker processes forked afterwards inherit it. Where the C library is not
glibc (macOS, Windows, musl), nothing changes. Setting ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` in
the environment before Python starts does the same.
"""

import ctypes
import ctypes.util
import logging
import platform

from lightning.pytorch import Callback, LightningModule, Trainer

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_RETAINED_BYTES", "RetainFreedMemory", "retain_freed_memory"]

DEFAULT_RETAINED_BYTES = 1 << 30

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def retain_freed_memory(threshold_bytes: int = DEFAULT_RETAINED_BYTES) -> bool:
    """Make glibc keep freed blocks up to ``threshold_bytes`` for reuse instead of returning them to the kernel.

    Args:
        threshold_bytes (int, optional): Requests below this size come from the heap, and the heap is trimmed only
            when more than this much is free at its top. Defaults to 1 GiB.

    Returns:
        bool: ``True`` if glibc accepted both settings; ``False`` where the C library is not glibc (nothing changed)
        or glibc rejected a setting (logged as a warning).

    Raises:
        ValueError: If ``threshold_bytes`` is not a positive int that fits a C ``int``.
    """
    _check_threshold(threshold_bytes)
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        logger.info("Freed memory is returned as usual: the C library here is not glibc.")
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    # Both are set even if one is refused: each keeps some memory on its own.
    mmap_accepted = libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes)
    trim_accepted = libc.mallopt(_M_TRIM_THRESHOLD, threshold_bytes)
    accepted = bool(mmap_accepted and trim_accepted)
    if not accepted:
        logger.warning(
            "glibc rejected mallopt(%d bytes); freed memory may still be returned to the kernel.", threshold_bytes
        )
    return accepted


class RetainFreedMemory(Callback):
    """Apply :func:`retain_freed_memory` when a CPU run starts (fit, validate, test or predict).

    Add it to any anomalib model's trainer, e.g. in a config::

        trainer:
          callbacks:
            - class_path: anomalib_gcaflow.toolkit.RetainFreedMemory

    Runs on an accelerator other than the CPU are left alone: their activations live in the device's own caching
    allocator.

    Args:
        threshold_bytes (int, optional): See :func:`retain_freed_memory`. Defaults to 1 GiB.

    Raises:
        ValueError: If ``threshold_bytes`` is not a positive int that fits a C ``int``.
    """

    def __init__(self, threshold_bytes: int = DEFAULT_RETAINED_BYTES) -> None:
        _check_threshold(threshold_bytes)
        self.threshold_bytes = threshold_bytes
        self.applied = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Apply the setting once, if the run computes on the CPU.

        Args:
            trainer (Trainer): The trainer; its root device decides.
            pl_module (LightningModule): Unused.
            stage (str): Unused; every stage allocates per batch.
        """
        del pl_module, stage
        if not self.applied and trainer.strategy.root_device.type == "cpu":
            self.applied = retain_freed_memory(self.threshold_bytes)


def _check_threshold(threshold_bytes: int) -> None:
    """Reject what ``mallopt`` cannot take (it reads a C ``int``), before anything is changed."""
    if isinstance(threshold_bytes, bool) or not isinstance(threshold_bytes, int) or not 0 < threshold_bytes < 2**31:
        msg = f"threshold_bytes must be an int in [1, 2**31 - 1] (bytes), got {threshold_bytes!r}"
        raise ValueError(msg)
