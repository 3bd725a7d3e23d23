"""Distributed: two CPU processes (DDP over gloo) train and test GCAFlow like one process does.

Validation and test count every image exactly once, although 7 images do not split evenly over 2 processes.

Stated tolerance: each process takes half of every training batch and DDP averages their gradients, which equals
the one-process gradient of the whole batch up to float summation order; so the flow's weights agree to 1e-5 and
every test metric to 1e-4. The weights are compared with MSFlow's initialisation (``data_init=False``): the
data-dependent start standardises the first batch exactly, which makes some first gradients zero up to rounding, and
Adam turns rounding noise into full-size steps. Its ActNorm, set from both processes' halves together, is compared
on its own (``test_actnorm_initialises_from_every_process``).
"""

from pathlib import Path

import pytest
import torch
from anomalib.metrics import AUROC, AnomalibMetric, Evaluator, F1Score
from lightning.pytorch import seed_everything
from tiny_training import tiny_datamodule, tiny_engine, tiny_gcaflow
from torchmetrics import Metric

TEST_IMAGES = 7  # tiny_folder: 4 normal + 3 anomalous
TRAIN_IMAGES = 8


class _Count(Metric):
    """Number of values seen, summed over processes."""

    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        self.count += values.numel()

    def compute(self) -> torch.Tensor:
        return self.count


class ImageCount(AnomalibMetric, _Count):
    """How many images an evaluation scored, across all processes."""


def _evaluator() -> Evaluator:
    def metrics() -> list:
        return [
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            ImageCount(fields=["pred_score"], prefix="image_"),
        ]

    # Test F1 uses the labels thresholded at what validation learned, so it also checks validation's result.
    test_metrics = [*metrics(), F1Score(fields=["pred_label", "gt_label"], prefix="image_")]
    return Evaluator(val_metrics=metrics(), test_metrics=test_metrics)


def _train_and_test(data: Path, root_dir: Path, processes: int) -> tuple[dict, dict, dict]:
    """Train 2 epochs on all 8 images per step (split over the processes), then test."""
    seed_everything(0)
    model = tiny_gcaflow(max_epochs=2, evaluator=_evaluator(), data_init=False)
    distributed = {"devices": processes, "strategy": "ddp_spawn"} if processes > 1 else {}
    engine = tiny_engine(root_dir, max_epochs=2, **distributed)
    datamodule = tiny_datamodule(data, train_batch_size=TRAIN_IMAGES // processes)
    engine.fit(model, datamodule=datamodule)
    validation = {name: float(value) for name, value in engine.trainer.callback_metrics.items()}
    test = engine.test(model, datamodule=datamodule, verbose=False)[0]
    return validation, test, model.model.flow.state_dict()


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_and_counts_each_image_once(tiny_folder: Path, tmp_path: Path) -> None:
    one_validation, one_test, one_weights = _train_and_test(tiny_folder, tmp_path / "one", processes=1)
    ddp_validation, ddp_test, ddp_weights = _train_and_test(tiny_folder, tmp_path / "ddp", processes=2)

    # Lightning's default sampler would pad 7 images to 8 by repeating the first one.
    assert one_validation["image_ImageCount"] == ddp_validation["image_ImageCount"] == TEST_IMAGES
    assert one_test["image_ImageCount"] == ddp_test["image_ImageCount"] == TEST_IMAGES

    for name, value in one_weights.items():
        assert torch.allclose(ddp_weights[name], value, atol=1e-5), name
    assert ddp_test.keys() == one_test.keys()
    for name, value in one_test.items():
        assert ddp_test[name] == pytest.approx(value, abs=1e-4), name
    assert ddp_validation["image_AUROC"] == pytest.approx(one_validation["image_AUROC"], abs=1e-4)


def _initialise_half(rank: int, world_size: int, port: int, batch: torch.Tensor, out: Path) -> None:
    """One process of a gloo group: ActNorm sees its half of the batch and saves the affine it arrives at."""
    import torch.distributed as dist

    from anomalib_gcaflow.model.flow.actnorm import ActNorm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        norm = ActNorm(batch.shape[1]).double()
        norm((batch[rank::world_size],))
        torch.save(norm.state_dict(), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_actnorm_initialises_from_every_process(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    from anomalib_gcaflow.model.flow.actnorm import ActNorm

    batch = 3 + 4 * torch.randn(8, 5, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_initialise_half, args=(2, port, batch, tmp_path), nprocs=2, join=True)
    whole = ActNorm(5).double()
    whole((batch,))
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(state["shift"], whole.shift, atol=1e-12)
        assert torch.allclose(state["log_std"], whole.log_std, atol=1e-12)
