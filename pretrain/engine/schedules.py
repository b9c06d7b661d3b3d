"""Per-step schedules: learning rate (warm-up + cosine) and teacher momentum (SlotCon Sec. 4.1).

Both are pure functions of the global step so that a resumed run continues them exactly.
"""
from __future__ import annotations

import math

from pretrain.models.teacher import teacher_momentum


def peak_lr(base_lr: float, batch_size: int, scale: bool = True) -> float:
    """Linear scaling rule of SlotCon Sec. 4.1: ``LearningRate = base_lr x BatchSize / 256``."""
    return base_lr * batch_size / 256.0 if scale else base_lr


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, min_lr: float) -> float:
    """Learning rate at global step ``k`` (0-based) of ``K``.

    Warm-up (``k < W``): linear from ``peak/100`` to ``peak``: ``peak/100 + (peak - peak/100) k / W``.
    Then cosine: ``min_lr + (peak - min_lr) (1 + cos(pi (k - W) / (K - W))) / 2``.
    """
    if total_steps <= 0:
        raise ValueError(f"lr_at: total_steps must be positive, got {total_steps}")
    start = peak / 100.0
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(step - warmup_steps, span) / span
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def momentum_at(step: int, total_steps: int, base: float) -> float:
    """Teacher EMA momentum ``1 - (1 - base)(cos(pi k / K) + 1) / 2`` (from ``pretrain.models.teacher``)."""
    return teacher_momentum(min(step, total_steps), total_steps, base)


__all__ = ["peak_lr", "lr_at", "momentum_at"]
