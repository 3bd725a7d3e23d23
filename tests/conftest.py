"""Shared fixtures: offline hub, real data location, small helpers."""

import os
from pathlib import Path

import pytest
from repo_paths import REPO_ROOT
from tiny_training import make_tiny_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRUST_REMOTE_CODE", "1")
# The tests compare fp32 results to tight tolerances. oneDNN runs fp32 convolutions and matmuls in bf16 on CPUs that
# accelerate it (AVX512_BF16, AMX) when this variable says so; it is pinned to full fp32 here (oneDNN reads it at
# its first primitive) and inherited by the CLI subprocesses. torch's own switches (set_float32_matmul_precision,
# torch.backends.mkldnn.fp32_precision) keep their fp32 defaults: setting the new one makes torch.export refuse to
# trace (it sees legacy and new TF32 flags mixed).
os.environ["ONEDNN_DEFAULT_FPMATH_MODE"] = "STRICT"

DATA_ROOT = Path(os.environ.get("GCAFLOW_DATA_ROOT", REPO_ROOT.parent / "shared" / "data"))
MVTEC_ROOT = DATA_ROOT / "mvtec_ad"
MAGNETIC_TILE_ROOT = DATA_ROOT / "magnetic_tile"


@pytest.fixture(scope="session")
def mvtec_root() -> Path:
    """The real MVTec AD folder (bottle only); tests that need it skip with the reason where it is absent."""
    if not (MVTEC_ROOT / "bottle" / "train" / "good").is_dir():
        pytest.skip(f"real MVTec AD bottle data not found under {MVTEC_ROOT}")
    return MVTEC_ROOT


@pytest.fixture(scope="session")
def magnetic_tile_root() -> Path:
    """The real Magnetic Tile folder."""
    if not (MAGNETIC_TILE_ROOT / "MT_Free" / "Imgs").is_dir():
        pytest.skip(f"real Magnetic Tile data not found under {MAGNETIC_TILE_ROOT}")
    return MAGNETIC_TILE_ROOT


@pytest.fixture(scope="session")
def tiny_folder(mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small Folder data set (64 px), built once per session."""
    return make_tiny_folder(mvtec_root, tmp_path_factory.mktemp("tiny_folder"))
