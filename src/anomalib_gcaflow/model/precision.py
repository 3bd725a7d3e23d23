"""bf16 training on CPUs: fast where the CPU has bf16 instructions, very slow where oneDNN has to emulate them."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# /proc/cpuinfo flags of native bf16 arithmetic: x86 AVX512_BF16 and AMX-BF16, Arm's BF16 extension.
_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_accelerates_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Tell whether this CPU computes bf16 natively.

    ``torch.backends.cpu.get_cpu_capability()`` reports the vector width (``"AVX512"`` on CPUs with and without
    AVX512_BF16), so the kernel's CPU flags are read instead.

    Args:
        cpuinfo (Path, optional): The file listing the CPU flags. Defaults to ``/proc/cpuinfo``.

    Returns:
        bool | None: ``True`` or ``False``, or ``None`` where the flags cannot be read (not Linux).
    """
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    flags = {
        flag
        for line in text.splitlines()
        if line.split(":", 1)[0].strip() in {"flags", "Features"}
        for flag in line.split(":", 1)[1].split()
    }
    return bool(flags & _BF16_CPU_FLAGS)


@functools.cache
def warn_slow_cpu_bf16() -> None:
    """Warn, once per process, that bf16 on this CPU is emulated and much slower than fp32."""
    logger.warning(
        "GCAFlow: bf16 precision on a CPU without bf16 instructions (no avx512_bf16 or amx_bf16 flag): oneDNN "
        "emulates it, about 15x slower than fp32. Use --trainer.precision 32 on this machine.",
    )
