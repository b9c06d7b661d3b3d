"""What every method shares: the student encoder and dense projector, EMA teacher copies of named
parts, the batch prologue, and the slot diagnostics (docs/contracts.md, Method API).

A method subclasses :class:`TeacherStudentMethod`, builds its own parts after ``super().__init__``,
calls :meth:`~TeacherStudentMethod.add_teachers` for the parts the teacher copies, and registers a
factory with ``@register_method``. The teacher follows the student by EMA (SlotCon Sec. 3.3).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models.encoder import build_encoder
from ..models.heads import Projector
from ..models.teacher import ema_update_modules_, make_teacher
from .config import ModelConfig


class TeacherStudentMethod(nn.Module):
    """Student encoder f_θ and projector g_θ plus ``teacher_<name>`` EMA copies (f_ξ, g_ξ, ...).

    Attributes: ``encoder``, ``projector`` and, once :meth:`add_teachers` ran, ``teacher_<name>``
    for each named part. Teacher parameters never require grad.
    """

    #: Batch keys :meth:`views` insists on (docs/contracts.md, Batch).
    batch_keys: tuple[str, ...] = ("view1", "view2")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg.arch, zero_init_residual=cfg.zero_init_residual, stem_pool=cfg.stem_pool,
                                     last_stride=cfg.last_stride)
        self.projector = Projector(self.encoder.num_features, cfg.dim_hidden, cfg.dim_out)
        self._teacher_of: tuple[str, ...] = ()

    # ---- teacher -------------------------------------------------------------------------
    def add_teachers(self, *names: str) -> None:
        """Create ``teacher_<name>``, a frozen copy of student part ``name``, for each name; the
        EMA update of :meth:`update_teacher` covers exactly these parts."""
        for name in names:
            setattr(self, f"teacher_{name}", make_teacher(getattr(self, name)))
        self._teacher_of = self._teacher_of + names

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(teacher, student)`` module pairs, looked up on each call so that SyncBN conversion
        (which replaces the modules) is followed."""
        return [(getattr(self, f"teacher_{n}"), getattr(self, n)) for n in self._teacher_of]

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """ξ <- m ξ + (1 - m) θ over every teacher part (SlotCon Sec. 3.3).

        Called by the engine at the start of each step, before the forward pass (recipe).
        """
        ema_update_modules_(self.ema_pairs(), momentum)

    def teacher_backbone(self) -> nn.Module:
        """The teacher encoder f_ξ (torchvision ResNet keys, no fc): what transfer uses."""
        return self.teacher_encoder

    # ---- dense features ------------------------------------------------------------------
    def student_dense(self, images: Tensor) -> Tensor:
        """``g_θ(f_θ(x))``: the student's projected feature map ``(B, D, h, w)``."""
        return self.projector(self.encoder(images))

    def teacher_dense(self, images: Tensor) -> Tensor:
        """``g_ξ(f_ξ(x))``: the teacher's projected feature map (call under ``no_grad``)."""
        return self.teacher_projector(self.teacher_encoder(images))

    # ---- training step -------------------------------------------------------------------
    def views(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(view1, view2)`` of a two-view batch, after checking that it has :attr:`batch_keys`.

        One pass per view through each network follows (BN statistics per view, recipe).
        """
        missing = [k for k in self.batch_keys if k not in batch]
        if missing:
            raise KeyError(f"{type(self).__name__}.forward: batch lacks keys {missing} (see docs/contracts.md)")
        return batch["view1"], batch["view2"]


def slot_diagnostics(active: Tensor, b: int) -> dict[str, Tensor]:
    """Active-slot counts of the teacher (SlotCon Eq. 5) for a ``[view1; view2]`` batch of ``2b`` images.

    ``active``: ``(2b, K)`` bool; returns the mean count per image over both views and per view.
    """
    count = active.sum(dim=1).float()
    return {"active_slots": count.mean(), "active_slots_1": count[:b].mean(), "active_slots_2": count[b:].mean()}


__all__ = ["TeacherStudentMethod", "slot_diagnostics"]
