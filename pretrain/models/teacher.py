"""EMA teacher (SlotCon Sec. 3.3): xi <- lambda_t * xi + (1 - lambda_t) * theta.

The momentum lambda_t follows a cosine schedule from its base value to 1 (Sec. 4.1).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from torch import nn


def teacher_momentum(step: int, total_steps: int, base: float) -> float:
    """Teacher momentum at step ``k`` of ``K``: ``1 - (1 - base) * (cos(pi k / K) + 1) / 2``."""
    if total_steps <= 0:
        raise ValueError(f"teacher_momentum: total_steps must be positive, got {total_steps}")
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / total_steps) + 1.0) / 2.0


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen deep copy of ``student`` (same weights; parameters never require grad)."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update_(teacher: Iterable[torch.Tensor], student: Iterable[torch.Tensor], momentum: float) -> None:
    """In place ``t <- m * t + (1 - m) * s`` over matching parameter lists (fused foreach op)."""
    t_list, s_list = list(teacher), list(student)
    if len(t_list) != len(s_list):
        raise ValueError(f"ema_update_: {len(t_list)} teacher vs {len(s_list)} student tensors")
    if not t_list:
        return
    # lerp(t, s, 1 - m) == m * t + (1 - m) * s, one multi-tensor kernel instead of ~300 small ones.
    torch._foreach_lerp_(t_list, [s.detach() for s in s_list], 1.0 - momentum)


@torch.no_grad()
def ema_update_modules_(pairs: Iterable[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """:func:`ema_update_` over ``(teacher, student)`` module pairs, as one fused update.

    Parameter lists are rebuilt on each call so the update survives SyncBN conversion.
    """
    teacher: list[torch.Tensor] = []
    student: list[torch.Tensor] = []
    for t, s in pairs:
        teacher.extend(t.parameters())
        student.extend(s.parameters())
    ema_update_(teacher, student, momentum)


__all__ = ["teacher_momentum", "make_teacher", "ema_update_", "ema_update_modules_"]
