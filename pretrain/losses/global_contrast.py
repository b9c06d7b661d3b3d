"""Global contrastive loss on pooled slots (Baldassarre & Azizpour; paper 000, Sec. 2.1-2.2, Eq. 1).

The global branch aggregates an image's object tokens permutation-invariantly, ``r = avg(S)``, and a
head projects it to ``p^G``. Eq. 1 is SimCLR's loss: ``p^G_ab`` must pick its other view ``(ā, b)``
among the ``2B - 1`` other inputs of the batch (``2B·world - 1`` across ranks). It is the ``ctr_all``
object loss with one token per image and the identity matching, and is computed as such.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .object_losses import ctr_all_loss


def pool_slots(slots: Tensor) -> Tensor:
    """``r = avg(S)``: ``(B, S, D) -> (B, D)`` (Sec. 2.1, "Projection heads")."""
    if slots.dim() != 3:
        raise ValueError(f"pool_slots: expected (B, S, D) slots, got {tuple(slots.shape)}")
    return slots.mean(dim=1)


def global_contrastive_loss(q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, tau: float) -> Tensor:
    """Eq. 1 averaged over the ``2B`` inputs: queries ``q_a`` ``(B, D)`` against keys ``k_a`` ``(B, D)``.

    With ``k = q`` it is exactly Eq. 1 (SimCLR); with ``k`` an EMA teacher's projections it is its
    MoCo-v3-style form. The query's own key ``(a, b)`` is excluded from the denominator.
    """
    if q1.dim() != 2 or q1.shape != q2.shape or k1.shape[0] != q1.shape[0] or k2.shape[0] != q1.shape[0]:
        raise ValueError(
            f"global_contrastive_loss: expected (B, D) inputs, got {tuple(q1.shape)}, {tuple(q2.shape)}, "
            f"{tuple(k1.shape)}, {tuple(k2.shape)}"
        )
    ident = torch.zeros(q1.shape[0], 1, dtype=torch.long, device=q1.device)
    return ctr_all_loss(q1[:, None], q2[:, None], k1[:, None], k2[:, None], ident, ident, tau)


__all__ = ["pool_slots", "global_contrastive_loss"]
