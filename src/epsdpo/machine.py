"""What machine a figure was measured on: sampling at a fixed seed and every timing depend on it."""

from __future__ import annotations

import platform
from pathlib import Path

__all__ = ["cpu_has_native_bf16", "machine_label"]


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_has_native_bf16() -> bool:
    """Whether this CPU advertises bf16 matmul instructions (AVX512-BF16 or AMX); unknown platforms count as yes."""
    flags = _cpuinfo()
    return not flags or any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def machine_label() -> str:
    """The CPU model (and GPU, if one is used), its bf16 support and the torch build, in one line."""
    import torch

    info = _cpuinfo()
    names = (line.partition(":")[2].strip() for line in info.splitlines() if line.startswith("model name"))
    cpu = next(names, "") or platform.processor() or platform.machine()
    bf16 = ("native bf16" if cpu_has_native_bf16() else "no native bf16") if info else "bf16 unknown"
    label = f"{cpu} ({bf16}), {torch.get_num_threads()} threads, torch {torch.__version__}"
    if torch.cuda.is_available():
        label += f", GPU {torch.cuda.get_device_name(0)}"
    return label
