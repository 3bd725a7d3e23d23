"""The convergence study (python -m benchmarks.convergence) on a tiny budget, and its float64 metrics."""

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.metrics import AUPRO
from sklearn.metrics import roc_auc_score

from anomalib_gcaflow import GCAFlow
from anomalib_gcaflow.model.anomaly_map import AnomalyMapGenerator
from benchmarks import convergence
from benchmarks.convergence_run import Settings, train_and_evaluate
from benchmarks.data import defect_type
from benchmarks.raw_eval import auroc, pro, raw_metrics, raw_outputs


def test_float64_metrics_match_the_reference_definitions() -> None:
    """AUROC equals scikit-learn's, PRO equals anomalib's AUPRO where float32 creates no ties, ties count half."""
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 32, 32), dtype=bool)
    masks[1, 4:12, 4:12] = masks[2, 20:30, 2:9] = masks[2, 1:4, 25:31] = masks[3, 10:20, 10:20] = True
    maps = rng.random(masks.shape) + 0.7 * masks
    labels = masks.reshape(4, -1).any(axis=1).astype(int)
    scores = maps.reshape(4, -1).max(axis=1)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert auroc(maps, masks) == pytest.approx(roc_auc_score(masks.reshape(-1), maps.reshape(-1)), abs=1e-12)

    reference = AUPRO(fields=("anomaly_map", "gt_mask"), fpr_limit=0.3)
    reference.update(SimpleNamespace(anomaly_map=torch.from_numpy(maps).float(), gt_mask=torch.from_numpy(masks).int()))
    assert pro(maps, masks) == pytest.approx(float(reference.compute()), abs=1e-5)

    # Scores that differ only beyond float32's precision: float64 still ranks them, a tie counts one half.
    close = 1.0 - np.array([1e-12, 2e-12, 3e-12, 4e-12])
    assert auroc(close, np.array([1, 1, 0, 0])) == 1.0
    assert auroc(np.ones(4), np.array([1, 1, 0, 0])) == 0.5


def test_breakdowns_per_defect_type_and_per_feature_scale() -> None:
    """Defect types come from either layout's paths; each scale's score is the model's score of that latent alone."""
    assert defect_type("/d/bottle/test/broken_large/000.png") == "broken_large"
    assert defect_type("/d/magnetic_tile/defect/Blowhole_exp1_num_4727.jpg") == "Blowhole"

    torch.manual_seed(0)
    model = GCAFlow(
        backbone="tf_efficientnet_lite0", pre_trained=False, image_size=(64, 64), depths=(1, 1, 1), expansion=1
    ).eval()
    paths = ["/d/test/good/0.png", "/d/test/crack/1.png", "/d/test/good/2.png", "/d/test/hole/3.png"]
    labels = torch.tensor([0, 1, 0, 1])
    batch = SimpleNamespace(
        image=torch.rand(4, 3, 64, 64), gt_mask=torch.zeros(4, 64, 64), gt_label=labels, image_path=paths
    )
    batch.gt_mask[1, 10:20, 10:20] = batch.gt_mask[3, 30:40, 5:15] = 1
    outputs = raw_outputs(model, [batch])
    assert outputs["defect_types"].tolist() == ["good", "crack", "good", "hole"]

    with torch.no_grad():
        image, _ = model.pre_processor.transform(batch.image, batch.gt_mask)
        latents, _ = model.model.flow(model.model.extract_features(image))
        expected = [model.model.anomaly_map_generator([z], (64, 64))[1] for z in latents]
    assert outputs["scale_scores"].shape == (4, 3)
    assert np.allclose(outputs["scale_scores"], torch.stack(expected, dim=1).double().numpy())
    assert not model.model.flow._forward_hooks
    # Every scoring from the same latents; the model's own (msflow) is what it output; an untracked model has no
    # standardised statistics, so the scorings that read them are left out.
    assert list(outputs["scorings"]) == ["msflow", "likelihood"]
    assert np.array_equal(outputs["scorings"]["msflow"]["scores"], outputs["scores"])
    assert np.array_equal(outputs["scorings"]["msflow"]["maps"], outputs["maps"])
    likelihood_map, likelihood_score = AnomalyMapGenerator(image_score="likelihood", pixel_map="likelihood")(
        latents, (64, 64)
    )
    assert np.allclose(outputs["scorings"]["likelihood"]["scores"], likelihood_score.double().numpy())
    assert np.allclose(outputs["scorings"]["likelihood"]["maps"], likelihood_map[:, 0].double().numpy())

    # Under "standardized" scoring each scale is scored with its own statistics.
    model.model.train()(batch.image)
    generator = model.model.anomaly_map_generator
    generator.image_score = "standardized"
    tracked = raw_outputs(model.eval(), [batch])
    standardized = tracked["scale_scores"]
    assert list(tracked["scorings"]) == ["msflow", "likelihood", "standardized", "bounded"]
    assert np.array_equal(tracked["scorings"]["standardized"]["scores"], tracked["scores"])
    assert np.array_equal(tracked["scorings"]["msflow"]["maps"], tracked["maps"])
    with torch.no_grad():  # the training pass initialised the flow's ActNorms: new latents
        latents, _ = model.model.flow(model.model.extract_features(image))
    for index, z in enumerate(latents):
        alone = (-0.5 * z.square().mean(1, keepdim=True) - generator.running_mean[index]) / (
            generator.running_var[index] + 1e-6
        ).sqrt()
        low = -(-F.interpolate(alone, size=(64, 64), mode="bilinear", align_corners=True).flatten(1)).topk(122).values
        assert np.allclose(standardized[:, index], -(torch.logsumexp(low, 1) - math.log(122)).numpy(), rtol=1e-5)
    generator.image_score = "msflow"

    metrics = raw_metrics(outputs)
    scores = outputs["scores"]
    assert metrics["image_AUROC_by_defect"] == {
        "crack": auroc(scores[[0, 1, 2]], np.array([0, 1, 0])),
        "hole": auroc(scores[[0, 2, 3]], np.array([0, 0, 1])),
    }
    assert metrics["image_AUROC_by_scale"] == [auroc(column, labels.numpy()) for column in outputs["scale_scores"].T]
    likelihood = outputs["scorings"]["likelihood"]
    assert metrics["by_scoring"]["likelihood"] == {
        "image_AUROC": auroc(likelihood["scores"], labels.numpy()),
        "pixel_AUROC": auroc(likelihood["maps"], outputs["masks"]),
        "PRO": pro(likelihood["maps"], outputs["masks"]),
    }
    assert metrics["by_scoring"]["msflow"]["image_AUROC"] == metrics["image_AUROC"]


def _settings(mvtec_root: Path, tmp_path: Path, *extra: str) -> Settings:
    return convergence.parse_args([
        "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--data-root", str(mvtec_root.parent),
        "--datasets", "bottle", "--seeds", "0", "--image-size", "64", "--epochs", "2", "--batch-size", "4",
        "--limit", "4", "--num-workers", "0", "--patchcore-coreset-ratio", "0.1",
        "--gcaflow-args", "lr=1e-3", "warmup_epochs=0", *extra,
    ])  # fmt: skip


def test_precision_is_part_of_the_protocol_without_changing_full_precision_digests(
    mvtec_root: Path, tmp_path: Path
) -> None:
    """bf16 runs are another protocol; full-precision records keep the digest they had before the option existed."""
    full = _settings(mvtec_root, tmp_path, "--eval-epochs", "1").study
    mixed = _settings(mvtec_root, tmp_path, "--eval-epochs", "1", "--precision", "bf16-mixed").study
    assert full.precision == "32-true" and full.autocast_dtype() is None
    assert mixed.autocast_dtype() is torch.bfloat16 and mixed.digest() != full.digest()
    fields = {key: value for key, value in asdict(full).items() if key != "precision"}
    assert full.digest() == hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


@pytest.mark.slow
def test_tiny_study_records_resume_and_identical_trajectory(mvtec_root: Path, tmp_path: Path) -> None:
    """GCAFlow (evaluated after epochs 1 and 2) and PatchCore: records, summary, resume, and no effect of evaluating."""
    settings = _settings(mvtec_root, tmp_path, "--models", "gcaflow", "patchcore", "--eval-epochs", "1", "2")
    summary = convergence.run_study(settings)
    assert summary["failed_runs"] == [] and summary["invocation"]["runs_done"] == 2
    runs = sorted((tmp_path / "out" / "runs").glob("*.json"))
    digest = settings.study.digest()
    assert [path.name for path in runs] == [
        f"bottle__gcaflow__seed0__{digest}.json",
        f"bottle__patchcore__seed0__{digest}.json",
    ]
    for path in runs:
        record = json.loads(path.read_text())
        trained = record["model"] == "gcaflow"
        assert record["kind"] == ("trajectory" if trained else "one_pass")
        assert [point["epoch"] for point in record["points"]] == ([1, 2] if trained else [1])
        for point in record["points"]:
            for metric in ("image_AUROC", "pixel_AUROC", "PRO"):
                assert 0.0 <= point["metrics"][metric] <= 1.0, (path.name, metric)
            assert point["train_cpu_s"] > 0 and point["eval_s"] > 0
            assert math.isfinite(point["train_loss"]) if trained else "train_loss" not in point
            by_defect = point["metrics"]["image_AUROC_by_defect"]
            assert set(by_defect) <= {"broken_large", "broken_small", "contamination"} and by_defect
            assert (
                len(point["metrics"]["image_AUROC_by_scale"]) == 3
                if trained
                else "image_AUROC_by_scale" not in point["metrics"]
            )
            assert (
                set(point["metrics"]["by_scoring"]) == {"msflow", "likelihood", "standardized", "bounded"}
                if trained
                else "by_scoring" not in point["metrics"]
            )
        if trained:
            first, last = record["points"]
            assert last["train_s"] > first["train_s"] and last["train_cpu_s"] > first["train_cpu_s"]
            assert record["config"]["init_args"]["lr"] == 1e-3 and record["config"]["init_args"]["max_epochs"] == 2
        assert 0.0 <= record["anomalib_test"]["metrics"]["image_AUROC"] <= 1.0
        assert record["load_average"]["cpus_usable"] > 0 and "shared" in record["load_average"]
        assert record["versions"]["git"] and record["machine"]["cpu"]
    assert set(summary["summary"]["bottle"]) == {"gcaflow", "patchcore"}
    assert [e["epoch"] for e in summary["summary"]["bottle"]["gcaflow"]] == [1, 2]
    table = (tmp_path / "out" / "convergence.md").read_text()
    assert "| GCAFlow (paper defaults) | 2 | 1 |" in table
    assert "| model | epoch | broken_" in table and "| scale 3 |" in table
    assert "| GCAFlow (paper defaults) | 2 | standardized |" in table
    assert (tmp_path / "out" / "convergence.png").read_bytes().startswith(b"\x89PNG")

    written = {path.name: path.stat().st_mtime_ns for path in runs}
    again = convergence.run_study(settings)
    assert again["invocation"]["runs_kept"] == 2 and again["invocation"]["runs_done"] == 0
    assert {path.name: path.stat().st_mtime_ns for path in runs} == written

    # Evaluating after epoch 1 changes nothing of the training: the same final weights as evaluating only at 2.
    _, evaluated_twice = train_and_evaluate("gcaflow", "bottle", 0, 2, (1, 2), settings, {})
    _, evaluated_once = train_and_evaluate("gcaflow", "bottle", 0, 2, (2,), settings, {})
    twice, once = evaluated_twice.state_dict(), evaluated_once.state_dict()
    assert twice.keys() == once.keys()
    assert all(torch.equal(twice[key], once[key]) for key in twice)
