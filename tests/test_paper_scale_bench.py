"""The paper-scale speed benchmark runs end to end and its derived numbers follow from its measurements."""

import json
import math
from pathlib import Path

from benchmarks import paper_scale
from benchmarks.rates import native_precisions


def test_quick_paper_scale_run_is_consistent(tmp_path: Path) -> None:
    """Smoke run: both models in every native precision, fractions of the same precision's peak, epoch projection."""
    settings = paper_scale.parse_args([
        "--quick",
        "--output-dir",
        str(tmp_path),
        "--repeats",
        "1",
        "--train-repeats",
        "1",
    ])
    results = paper_scale.run(settings)
    # Off unless asked for: the setting is process-wide and would outlive this test.
    assert results["freed_memory_retained"] is False
    assert "glibc's default allocator" in (tmp_path / "paper_scale.md").read_text()
    assert paper_scale.parse_args(["--retain-freed-memory"]).retain_freed_memory
    assert json.loads((tmp_path / "paper_scale.json").read_text())["models"].keys() == set(paper_scale.MODELS)
    assert "## Flow" in (tmp_path / "paper_scale.md").read_text()
    peaks = results["machine_peak"]["peak_by_precision"]
    assert set(peaks) == set(native_precisions("cpu"))
    steps = math.ceil(paper_scale.CATEGORY_IMAGES / settings.batch_size)
    for name, measured in results["models"].items():
        rows = measured["rows"]
        assert {row["precision"] for row in rows} == set(peaks)
        for row in rows:
            assert row["gflop_per_batch"] > 0
            assert math.isclose(row["fraction_of_peak"], row["gflops"] / peaks[row["precision"]])
        for precision in peaks:
            train = next(r for r in rows if r["precision"] == precision and r["mode"].startswith("train"))
            forward = next(
                r
                for r in rows
                if r["precision"] == precision
                and r["batch_size"] == train["batch_size"]
                and r["mode"].startswith("inference")
            )
            # Backward costs about twice the forward (no gradient for the frozen features' input).
            assert 2.5 < train["gflop_per_batch"] / forward["gflop_per_batch"] < 3.5, name
            expected = steps * (train["ms_median"] + measured["adam_step_ms"]) / 1e3
            assert math.isclose(measured["epoch_seconds"][precision], expected)
    gcaflow_train_rows = [r for r in results["models"]["gcaflow"]["rows"] if r["mode"].startswith("train")]
    assert len(results["targets"]) == len(gcaflow_train_rows) == 2 * len(peaks)
    for row in gcaflow_train_rows:
        # The NCHW step's convolutions, replayed alone, hold almost all its counted FLOPs (the rest: GCA's bmm).
        ceiling = row.get("conv_ceiling")
        assert (ceiling is None) == row["channels_last"]
        if ceiling is not None:
            assert 0.9 < ceiling["conv_gflop_per_step"] / row["gflop_per_batch"] <= 1 + 1e-6
            # The H-Flow subnet's output projection runs as matrix products on the CPU (PointwiseConv2d).
            assert {c["kind"] for c in ceiling["convolutions"]} == {"forward", "backward", "matrix product"}
            assert math.isclose(row["non_conv_ms"], row["ms_median"] - ceiling["conv_ms_per_step"])
