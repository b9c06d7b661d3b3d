"""Mixed-precision choice: ``train.amp: auto`` picks what the device runs natively.

bfloat16 autocast is 1.4x faster than float32 on a CPU with AVX512-BF16 or AMX, but about 10x
*slower* on one without (AVX2 only: every bf16 op is emulated): measured 20 s vs 2.1 s per demo step
on a 2-core AVX2 EPYC. A config that hard-codes ``bf16`` for the CPU demo therefore runs well on one
machine and for hours on another; ``auto`` resolves per machine and the log says what it chose.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger("pretrain")

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


class ScalerWatch:
    """What fp16's GradScaler does to the run, which it otherwise does silently.

    The scaler skips the optimizer step whose gradients hold an Inf/NaN and halves its scale;
    ``update()`` lowers the scale exactly then, so a scale below the previous one marks a skipped
    step. A run whose every step is skipped trains nothing while its loss curve looks alive:
    after :attr:`STALL_STEPS` consecutive skipped steps it warns, once per such streak.
    """

    STALL_STEPS = 20

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler
        self.enabled = scaler.is_enabled()
        self.skipped_total = 0
        self.streak = 0
        # the scale a resumed scaler starts from (read once the checkpoint's scaler state is loaded)
        self.last_scale = scaler.get_scale() if self.enabled else 1.0

    def after_update(self, step: int) -> dict[str, float]:
        """Call after ``scaler.update()``; returns the values to log (none without the scaler)."""
        if not self.enabled:
            return {}
        scale = self.scaler.get_scale()
        if scale < self.last_scale:
            self.skipped_total += 1
            self.streak += 1
            if self.streak == self.STALL_STEPS:
                log.warning("fp16: %d consecutive optimizer steps skipped by the GradScaler (Inf/NaN gradients) up to "
                            "step %d; the scale is down to %.3g. The weights are not being updated: lower the LR, "
                            "enable optim.clip_grad, or use train.amp=bf16", self.streak, step, scale)
        else:
            self.streak = 0
        self.last_scale = scale
        return {"amp_scale": scale, "amp_skipped_steps": self.skipped_total}


__all__ = ["ScalerWatch", "AMP_CHOICES", "amp_dtype", "cpu_flags", "cpu_has_native_bf16", "resolve_amp"]
