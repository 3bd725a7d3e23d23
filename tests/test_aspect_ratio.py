"""Inputs far from square: a (H, W) image_size keeps the parts' proportions, end to end."""

from pathlib import Path

import pytest
import torch
from tiny_training import tiny_datamodule, tiny_engine, tiny_gcaflow


@pytest.mark.slow
def test_tall_image_size_trains_tests_and_predicts(tiny_folder: Path, tmp_path: Path) -> None:
    model = tiny_gcaflow(image_size=(128, 48), max_epochs=2)
    engine = tiny_engine(tmp_path, max_epochs=2)
    datamodule = tiny_datamodule(tiny_folder)
    engine.fit(model=model, datamodule=datamodule)
    [metrics] = engine.test(model=model, datamodule=datamodule, verbose=False)
    assert all(0 <= metrics[name] <= 1 for name in ("image_AUROC", "pixel_AUROC"))
    predictions = engine.predict(model=model, datamodule=datamodule, return_predictions=True)
    batch = predictions[0]
    # Maps come back at the input's own size; the flow itself saw a 128 x 48 image (strides 8, 16, 32).
    assert batch.anomaly_map.shape[-2:] == batch.image.shape[-2:]
    assert torch.isfinite(batch.anomaly_map).all() and torch.isfinite(batch.pred_score).all()
    with torch.no_grad():
        latents, _ = model.model.train()(model.pre_processor.transform(batch.image))
    assert [tuple(z.shape[-2:]) for z in latents] == [(16, 6), (8, 3), (4, 2)]
