"""Semantic grouping with K learnable prototypes (SlotCon Sec. 3.1-3.2, Eq. 1, 4).

SlotCon's grouping protocol maps dense projections ``z (B, D, H, W)`` to ``(slots (B, K, D), logits
(B, K, H, W))``; the logits are the cosine similarities ``z̄ · s̄ᵀ`` of Eq. 1 (the temperatures and
the centre are applied by the losses). Registered as ``model.grouping: prototypes``. The modules of
``pretrain/models/grouping.py`` reach the same protocol through ``SlotConGrouping``; the prototypes
have no ``GroupingOutput``, so methods that need one (objglobal) refuse them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register_grouping

if TYPE_CHECKING:
    from ..methods.config import ModelConfig


def prototype_similarity(z: Tensor, prototypes: Tensor) -> Tensor:
    """Cosine similarity ``z̄ · s̄ᵀ`` of Eq. 1 as a float32 ``(B, K, H, W)`` map.

    ``z``: ``(B, D, H, W)`` projections; ``prototypes``: ``(K, D)``. Normalisation and the product
    run in float32 so that the later softmax at small temperatures (0.07) is exact under autocast.
    """
    # autocast would run the einsum's bmm in half precision despite the .float() casts.
    with torch.autocast(z.device.type, enabled=False):
        zn = F.normalize(z.float(), dim=1)
        sn = F.normalize(prototypes.float(), dim=1)
        return torch.einsum("bdhw,kd->bkhw", zn, sn)


def attentive_pool(z: Tensor, logits: Tensor, tau: float, eps: float = 1e-6) -> Tensor:
    """Slots by attentive pooling (Eq. 4): ``S = Σ_ij A[i,j] z[i,j] / Σ_ij A[i,j]``.

    ``A = softmax_K(logits / tau) + eps`` (the recipe adds ``eps`` after the softmax and before the
    normalisation over pixels, and uses τt for student and teacher alike); ``z`` is the
    *un-normalised* projection ``(B, D, H, W)``. Returns ``(B, K, D)`` in float32.
    """
    with torch.autocast(z.device.type, enabled=False):
        attn = torch.softmax(logits.float() / tau, dim=1) + eps
        attn = attn / attn.sum(dim=(2, 3), keepdim=True)
        return torch.einsum("bdhw,bkhw->bkd", z.float(), attn)


class SemanticGrouping(nn.Module):
    """K learnable prototypes ``S ∈ R^{K×D}`` (Eq. 1) with attentive slot pooling (Eq. 4)."""

    def __init__(self, num_prototypes: int, dim: int, tau_pool: float = 0.07, eps: float = 1e-6) -> None:
        super().__init__()
        # nn.Embedding's N(0, 1) initialisation, as in the published recipe.
        self.weight = nn.Parameter(torch.randn(num_prototypes, dim))
        self.num_prototypes, self.dim = num_prototypes, dim
        self.tau_pool, self.eps = tau_pool, eps

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``z (B, D, H, W)`` -> ``(slots (B, K, D) float32, logits (B, K, H, W) float32)``."""
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise ValueError(f"SemanticGrouping: expected (B, {self.dim}, H, W) projections, got {tuple(z.shape)}")
        logits = prototype_similarity(z, self.weight)
        return attentive_pool(z, logits, self.tau_pool, self.eps), logits


@register_grouping("prototypes")
def build_prototypes(cfg: ModelConfig, dim: int) -> SemanticGrouping:
    """``model.grouping: prototypes``: SlotCon's K = ``model.num_prototypes`` prototypes of size ``dim``.

    Attentive pooling uses the teacher temperature for student and teacher (recipe, Eq. 4).
    """
    return SemanticGrouping(cfg.num_prototypes, dim, tau_pool=cfg.tau_t, eps=cfg.pool_eps)


__all__ = ["SemanticGrouping", "prototype_similarity", "attentive_pool", "build_prototypes"]
