"""The accuracy benchmark (python -m benchmarks.accuracy) on a tiny budget, so that its code path cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from repo_paths import REPO_ROOT

from benchmarks import accuracy
from benchmarks.models import build_model
from benchmarks.protocol import Protocol, seeds_for
from benchmarks.records import read_record
from benchmarks.shared_backbone import SharedBackbone


def _tiny_protocol(epochs: int = 1) -> Protocol:
    return Protocol(
        image_size=64,
        epochs=epochs,
        backbone="tf_efficientnet_lite0",
        weights_path=None,
        train_batch_size=4,
        eval_batch_size=4,
        gcaflow_lr=1e-3,
        gcaflow_warmup_epochs=0,
        gcaflow_milestones=(70, 90),
        patchcore_coreset_ratio=0.1,
        limit=4,
        magnetic_tile_limit=4,
        magnetic_tile_normal_limit=10,
        device="cpu",
    )


def test_every_model_family_gets_the_same_backbone_weights(tmp_path: Path) -> None:
    """GCAFlow, the re-backboned Fastflow, and Cflow/PatchCore through the timm folder all hold the same weights."""
    protocol = _tiny_protocol()
    backbone = SharedBackbone(protocol, tmp_path)
    reference = backbone.state
    models, extractors = {}, {}
    for name in ("gcaflow", "msflow_equiv", "fastflow", "cflow", "patchcore"):
        model, description = build_model(name, protocol, 64, backbone)
        models[name] = model
        if name == "cflow":
            extractors[name] = model.model.encoder.feature_extractor
        elif name == "patchcore":
            extractors[name] = model.model.feature_extractor.feature_extractor
        else:
            extractors[name] = model.model.feature_extractor.extractor
        state = extractors[name].state_dict()
        assert state, name
        assert all(torch.equal(value, reference[key]) for key, value in state.items()), name
        assert description["backbone_adaptation"], name
    # Each baseline reads its own default stages; the deepest one must be loaded too (Cflow: stride 32).
    assert any(key.startswith("blocks.6.") for key in extractors["cflow"].state_dict())

    hidden, _ = models["fastflow"].model(torch.randn(2, 3, 64, 64))
    assert [tuple(h.shape[1:]) for h in hidden] == [(24, 16, 16), (40, 8, 8), (112, 4, 4)]

    # A single changed tensor is caught: the comparison would otherwise silently be on two backbones.
    with torch.no_grad():
        next(iter(extractors["patchcore"].parameters())).add_(1e-3)
    with pytest.raises(RuntimeError, match="does not hold the shared"):
        backbone.check(extractors["patchcore"], "patchcore's backbone")


def test_seed_rules_and_paper_scale_switch() -> None:
    """The default CPU grid, later ``--seeds`` rules overriding earlier ones, and what ``--paper-scale`` changes."""
    cpu = accuracy.parse_args([])
    assert (cpu.protocol.image_size, cpu.protocol.backbone) == (256, "tf_efficientnet_lite0")
    assert seeds_for(cpu.seeds, "bottle", "gcaflow") == (0, 1, 2)
    assert seeds_for(cpu.seeds, "bottle", "cflow") == (0,)
    assert seeds_for(cpu.seeds, "magnetic_tile", "fastflow") == (0,)
    assert seeds_for(cpu.seeds, "magnetic_tile", "cflow") == ()

    rules = ("0,1,2", "magnetic_tile=", "bottle/cflow,patchcore=5", "gcaflow_k3=7")
    settings = accuracy.parse_args([f"--seeds={rule}" for rule in rules])
    assert seeds_for(settings.seeds, "bottle", "cflow") == (5,)
    assert seeds_for(settings.seeds, "bottle", "patchcore") == (5,)
    assert seeds_for(settings.seeds, "bottle", "fastflow") == (0, 1, 2)
    assert seeds_for(settings.seeds, "magnetic_tile", "gcaflow") == ()
    assert seeds_for(settings.seeds, "magnetic_tile", "gcaflow_k3") == (7,)
    for wrong in ("screws=0", "bottle/screws=0", "bottle=zero"):
        with pytest.raises(SystemExit):
            accuracy.parse_args(["--seeds", wrong])

    paper = accuracy.parse_args(["--paper-scale", "--device", "cpu", "--weights-path", "wrn50.pth"])
    assert (paper.protocol.image_size, paper.protocol.epochs, paper.protocol.backbone) == (512, 100, "wide_resnet50_2")
    assert (paper.protocol.gcaflow_lr, paper.protocol.gcaflow_warmup_epochs) == (1e-4, 12)
    assert paper.protocol.digest() != cpu.protocol.digest()


def test_resume_refuses_records_of_another_protocol(tmp_path: Path) -> None:
    """A record made under other settings is never mixed into the results of this command."""
    record = tmp_path / "bottle__gcaflow__seed0.json"
    record.write_text(json.dumps({"protocol_digest": _tiny_protocol(epochs=2).digest(), "protocol": {}}))
    assert read_record(record, _tiny_protocol(epochs=2)) is not None
    with pytest.raises(ValueError, match="another protocol"):
        read_record(record, _tiny_protocol(epochs=1))


@pytest.mark.slow
def test_tiny_grid_end_to_end_then_resume(mvtec_root: Path, magnetic_tile_root: Path, tmp_path: Path) -> None:
    """One command: 2 models x 2 real data sets x 1 seed, 1 epoch at 64 px, speed included; rerun resumes."""
    assert mvtec_root.parent == magnetic_tile_root.parent
    out = tmp_path / "results"
    command = [
        sys.executable, "-m", "benchmarks.accuracy",
        "--out", str(out), "--work-dir", str(tmp_path / "work"), "--data-root", str(mvtec_root.parent),
        "--models", "gcaflow,fastflow", "--seeds", "0", "--image-size", "64", "--epochs", "1", "--batch-size", "4",
        "--limit", "4", "--magnetic-tile-limit", "3", "--magnetic-tile-normal-limit", "10", "--num-workers", "0",
        "--speed-sizes", "64", "--speed-repeats", "1", "--speed-smoke", "--memory-batches", "1",
    ]  # fmt: skip
    environment = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    finished = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, check=False)
    assert finished.returncode == 0, finished.stderr[-4000:]

    runs = sorted((out / "runs").glob("*.json"))
    assert [path.name for path in runs] == [
        "bottle__fastflow__seed0.json",
        "bottle__gcaflow__seed0.json",
        "magnetic_tile__fastflow__seed0.json",
        "magnetic_tile__gcaflow__seed0.json",
    ]
    for path in runs:
        record = json.loads(path.read_text())
        assert record["status"] == "ok"
        assert record["protocol"]["image_size"] == 64
        assert record["timings"]["epochs"] == 1
        assert record["timings"]["train_s_per_epoch"] > 0
        assert record["backbone"]["name"] == "tf_efficientnet_lite0"
        assert record["versions"]["anomalib"] and record["machine"]["cpu_count"]
        assert 0 < record["data"]["train_images"] <= 8  # bottle: --limit 4; Magnetic Tile: 80 % of 10
        assert record["data"]["test_normal"] > 0 and record["data"]["test_anomalous"] > 0
        for metric in ("image_AUROC", "pixel_AUROC", "PRO", "image_F1"):
            assert 0.0 <= record["metrics"][metric] <= 1.0, (path.name, metric)

    summary = json.loads((out / "accuracy.json").read_text())
    assert set(summary["summary"]) == {"bottle", "magnetic_tile"}
    assert set(summary["summary"]["bottle"]) == {"gcaflow", "fastflow"}
    for model in ("gcaflow", "fastflow"):
        speed = summary["speed"][model]
        assert speed["trainable_params"] > 0 and speed["size_mb"] > 0
        assert speed["inference"]["64"]["latency_ms_b1"] > 0 and speed["inference"]["64"]["throughput_b16"] > 0
        assert speed["peak_train_memory_mb"] > 0 and speed["machine_peak"]["gflops"] > 0
    assert summary["ratios"]["fastflow"]["gcaflow"]["speed"]["latency_b1_ratio@64"] > 0

    report = (out / "accuracy.md").read_text()
    for heading in (
        "## Accuracy: MVTec AD bottle",
        "## Accuracy: Magnetic Tile",
        "## Speed",
        "## Relative to Fastflow",
    ):
        assert heading in report
    assert report.count("| GCAFlow (paper defaults) |") >= 4  # 2 accuracy tables, speed, per-run rows
    assert (out / "accuracy.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "--epochs 1" in (out / "COMMAND.md").read_text()

    written = {path.name: path.stat().st_mtime_ns for path in runs}
    again = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stderr.count("done before, kept") == 4
    assert {path.name: path.stat().st_mtime_ns for path in sorted((out / "runs").glob("*.json"))} == written
