"""RetainFreedMemory: a flow training step stops page-faulting its activations in, and nothing else changes."""

import json
import platform
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from anomalib_gcaflow.toolkit import RetainFreedMemory, allocator, retain_freed_memory

# A fresh interpreter per setting: mallopt cannot be undone inside a process.
_STEP_FAULTS = """
import json, resource, sys
import torch
from anomalib_gcaflow.model.flow import MultiScaleFlow
from anomalib_gcaflow.toolkit import retain_freed_memory

torch.manual_seed(0)
torch.set_num_threads(1)
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
flow = MultiScaleFlow([24, 40, 112])
features = [torch.randn(8, c, s, s) for c, s in ((24, 32), (40, 16), (112, 8))]
optimizer = torch.optim.Adam(flow.parameters(), lr=1e-4)

def step():
    latents, log_det = flow(features)
    loss = sum(0.5 * z.square().sum(dim=(1, 2, 3)) for z in latents).mean() - log_det.mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()

losses, faults = [], []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    losses.append(step())
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The first steps grow the heap to its working size; the later ones show the steady state.
print(json.dumps({"applied": applied, "faults": faults[4:], "losses": losses}))
"""


def _run_steps(mode: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _STEP_FAULTS, mode], capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting only exists in glibc")
def test_retained_memory_removes_most_page_faults_of_a_training_step_and_changes_no_number() -> None:
    stock, retained = _run_steps("stock"), _run_steps("retain")
    assert retained["applied"] is True
    # Steady state: a typical step touches almost no new page, and all steps together well under half the stock's.
    assert sorted(retained["faults"])[len(retained["faults"]) // 2] <= 50, retained["faults"]
    assert sum(retained["faults"]) < 0.5 * sum(stock["faults"]), (stock["faults"], retained["faults"])
    # Where memory comes from changes nothing computed in it.
    assert retained["losses"] == stock["losses"]


def test_other_c_libraries_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *_: pytest.fail("must not load the C library"))
    assert retain_freed_memory() is False


@pytest.mark.parametrize("threshold", [0, -1, 2**31, 1.5, True, "1G"])
def test_a_threshold_mallopt_cannot_take_is_rejected_before_anything_changes(threshold: object) -> None:
    with pytest.raises(ValueError, match="threshold_bytes"):
        retain_freed_memory(threshold)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold_bytes"):
        RetainFreedMemory(threshold)  # type: ignore[arg-type]


@pytest.mark.parametrize(("device", "expected_calls"), [("cpu", [1 << 20]), ("meta", [])])
def test_the_callback_applies_once_and_only_to_cpu_runs(
    monkeypatch: pytest.MonkeyPatch, device: str, expected_calls: list[int]
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda threshold: calls.append(threshold) or True)
    callback = RetainFreedMemory(1 << 20)
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
    for stage in ("fit", "test"):
        callback.setup(trainer, None, stage)  # type: ignore[arg-type]
    assert calls == expected_calls
    assert callback.applied is bool(expected_calls)
