"""Bi-level Optimised Query Slot Attention, BO-QSA (Jia et al.; paper 001, Sec. 3.3, Algorithm 1).

Slots start from learnable queries instead of a sampled Gaussian. The ``T`` refinement iterations
carry no gradient; the straight-through step ``slots = SG(slots) + init - SG(init)`` then hands the
final, differentiable iteration's gradient with respect to its input slots to the queries::

    slots = init
    for t in 1..T: slots = SA(slots, inputs)      # detached
    slots = SG(slots) + init - SG(init)           # straight-through estimator
    slots = SA(slots, inputs)                     # one differentiable iteration

So a forward pass applies ``T + 1`` Slot Attention steps, and only the last one is in the graph.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .grouping import GroupingOutput
from .registry import register_grouping
from .slot_attention import SlotAttention

if TYPE_CHECKING:
    from ..methods.config import ModelConfig


class QuerySlotAttention(SlotAttention):
    """Slot Attention with learnable query initialisation and BO-QSA's gradient path."""

    def _init_slots(self) -> None:
        # One learnable query per slot (replaces the shared Gaussian of Slot Attention).
        self.queries = nn.Parameter(torch.empty(1, self.num_slots, self.dim_slot))
        nn.init.xavier_uniform_(self.queries[0])

    def sample_noise(self, batch_size: int, device: torch.device | None = None) -> None:
        """Deterministic initialisation: no noise."""
        return None

    def initial_slots(self, batch_size: int, noise: Tensor | None = None) -> Tensor:
        """The learnable queries, broadcast to ``(B, S, D')`` (``noise`` is ignored)."""
        return self.queries.expand(batch_size, -1, -1)

    def run(self, feats: Tensor, slots: Tensor) -> GroupingOutput:
        """Algorithm 1 of BO-QSA from the initial slots ``init`` (normally the queries)."""
        init = slots
        k, v = self.inputs(feats)
        # The detached iterations build no graph at all (same values, no activation memory).
        with torch.no_grad():
            inner, _, _ = self.iterate(init.detach(), k.detach(), v.detach(), self.iters)
        slots = inner + init - init.detach()  # SG(slots) + init - SG(init)
        slots, attn, logits = self.step(slots, k, v)
        return self.output(slots, attn, logits, k, tuple(feats.shape[-2:]))

    def forward(self, feats: Tensor, noise: Tensor | None = None) -> GroupingOutput:
        """``feats (B, D, h, w)`` -> slots refined from the learnable queries."""
        return self.run(feats, self.initial_slots(feats.shape[0]))


@register_grouping("qsa")
def build_query_slot_attention(cfg: ModelConfig, dim: int) -> QuerySlotAttention:
    """``model.grouping: qsa`` (BO-QSA, paper 001): ``model.num_prototypes`` learnable queries of size
    ``dim``, ``model.slot_iters`` detached iterations plus one differentiable step."""
    return QuerySlotAttention(dim, cfg.num_prototypes, iters=cfg.slot_iters, eps=cfg.slot_eps,
                              pos_embed=cfg.slot_pos_embed)


__all__ = ["QuerySlotAttention", "build_query_slot_attention"]
