"""Mixed-precision choice: ``train.amp: auto`` picks what the device runs natively.

bfloat16 autocast is 1.4x faster than float32 on a CPU with AVX512-BF16 or AMX, but about 10x
*slower* on one without (AVX2 only: every bf16 op is emulated): measured 20 s vs 2.1 s per demo step
on a 2-core AVX2 EPYC. A config that hard-codes ``bf16`` for the CPU demo therefore runs well on one
machine and for hours on another; ``auto`` resolves per machine and the log says what it chose.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

AMP_CHOICES = ("auto", "none", "bf16", "fp16")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True where the CPU computes bfloat16 in hardware (AVX512-BF16 or AMX)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in _CPU_BF16_FLAGS)


def resolve_amp(amp: str, device: torch.device, flags: frozenset[str] | None = None) -> str:
    """``train.amp`` as run on ``device``: ``auto`` becomes ``bf16`` where the hardware has it, else
    ``fp16`` on CUDA (with the GradScaler) and ``none`` on a CPU; explicit choices are kept."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"train.amp must be one of {AMP_CHOICES}, got {amp!r}")
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16(flags) else "none"


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of a resolved ``train.amp`` (``None``: float32, no autocast)."""
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


__all__ = ["AMP_CHOICES", "amp_dtype", "cpu_flags", "cpu_has_native_bf16", "resolve_amp"]
