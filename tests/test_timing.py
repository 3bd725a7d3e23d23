"""The benchmarks' training clock: what counts as training time."""

import time

import torch
from anomalib.models.components import MemoryBankMixin
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.timing import TrainingClock

FIT_S = 0.4
VALIDATION_S = 0.6


class SlowMemoryBank(MemoryBankMixin, LightningModule):
    """A memory-bank model whose fit (run by anomalib when validation starts) and validation both take time."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        del batch, batch_idx

    def fit(self) -> None:
        time.sleep(FIT_S)

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        del batch, batch_idx
        time.sleep(VALIDATION_S)

    def configure_optimizers(self) -> None:
        return None


def test_clock_counts_a_memory_bank_fit_and_not_validation() -> None:
    """PatchCore's coreset selection is its training; it runs in ``on_validation_start`` and must be on the clock."""
    loader = DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=1)
    clock = TrainingClock("cpu")
    trainer = Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[clock],
    )
    trainer.fit(SlowMemoryBank(), train_dataloaders=loader, val_dataloaders=loader)
    wall_s, _ = clock.elapsed()
    assert FIT_S <= wall_s < FIT_S + VALIDATION_S
