"""Load: scoring a few thousand images keeps memory flat once warmed up."""

import itertools
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import normalize, pil_to_tensor

from anomalib_gcaflow import GCAFlowModel
from anomalib_gcaflow.model.backbones import backbone_normalization
from anomalib_gcaflow.model.flow import PositionalConv2d

LITE0 = "tf_efficientnet_lite0"
SIZE = 64
IMAGES = 3000
BATCH = 32
WARM_UP_BATCHES = 10
# Allocator noise is a few MB; keeping just each image's 64x64 float anomaly map would add 48 MB here.
RSS_GROWTH_LIMIT_MB = 24


def _rss_mb() -> float:
    """Resident memory of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no VmRSS in /proc/self/status")


@pytest.mark.slow
def test_scoring_thousands_of_images_keeps_memory_flat(mvtec_root: Path) -> None:
    if not Path("/proc/self/status").is_file():
        pytest.skip("resident memory is read from /proc (Linux only)")
    mean, std = backbone_normalization(LITE0)
    paths = sorted((mvtec_root / "bottle" / "test").glob("*/*.png"))
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(pil_to_tensor(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)))
    images = normalize(torch.stack(images).float() / 255, list(mean), list(std))
    # The real test images over and over; 3000 is not a multiple of 32, so the last batch is smaller.
    order = list(itertools.islice(itertools.cycle(range(len(images))), IMAGES))
    batches = [images[order[i : i + BATCH]] for i in range(0, IMAGES, BATCH)]

    torch.manual_seed(0)
    model = GCAFlowModel(backbone=LITE0, depths=(1, 1, 1), expansion=1).eval()
    convs = [m for m in model.modules() if isinstance(m, PositionalConv2d)]
    rss = []
    scored = 0
    with torch.inference_mode():
        for batch in batches:
            output = model(batch)
            scored += int(torch.isfinite(output.pred_score).sum())
            rss.append(_rss_mb())
    assert scored == IMAGES
    growth = max(rss[WARM_UP_BATCHES:]) - rss[WARM_UP_BATCHES]
    assert growth < RSS_GROWTH_LIMIT_MB, f"memory grew by {growth:.1f} MB after warm-up: {rss[::10]}"
    # The positional-response cache holds one entry per convolution, for the one feature-map size in use.
    assert convs
    for conv in convs:
        key, _, _, response = conv._cached_response
        assert key[0] == tuple(response.shape[-2:])
