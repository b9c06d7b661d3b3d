"""Slot Attention (Locatello et al., 2020; paper 003, Sec. 2 ablations and Sec. 5 details).

Algorithm 1 of the main paper, with every design choice the supplement ablates kept on:
softmax over *slots* (competition, Sec. 2 "Communication between slots"), weighted *mean* of the
values (Sec. 2 "Value aggregation") with an ``eps`` offset on the attention (Sec. 2 "Offset for
numerical stability", Table 10a: 1e-8), GRU update plus residual MLP (Sec. 2 "Recurrent update
function", "Feedforward network"), LayerNorm on inputs and slots (Sec. 2 "Layer normalization"),
``1/sqrt(D)`` scaling (Sec. 2 "Softmax temperature"), ``T`` iterations, slots initialised from a
learned Gaussian ``mu + exp(log_sigma) * N(0, 1)``, and the soft position embedding of Sec. 5.2.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .grouping import GroupingModule, GroupingOutput, pixel_slot_cosine
from .registry import register_grouping

if TYPE_CHECKING:
    from ..methods.config import ModelConfig


class SoftPositionEmbed(nn.Module):
    """Sec. 5.2: a ``(h, w, 4)`` grid of linear ramps ``[0, 1]`` towards the four borders, projected
    to the feature dimension by a learned linear map and added to the feature map."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(4, dim)

    @staticmethod
    def grid(h: int, w: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        """``(h, w, 4)`` grid ``[y, x, 1 - y, 1 - x]`` with ``y, x`` in ``[0, 1]``."""
        ys = torch.linspace(0.0, 1.0, h, device=device, dtype=dtype)
        xs = torch.linspace(0.0, 1.0, w, device=device, dtype=dtype)
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([y, x, 1.0 - y, 1.0 - x], dim=-1)

    def forward(self, feats: Tensor) -> Tensor:
        """``(B, D, h, w) -> (B, D, h, w)`` with the embedding added."""
        h, w = feats.shape[-2:]
        emb = self.proj(self.grid(h, w, feats.device, self.proj.weight.dtype))  # (h, w, D)
        return feats + emb.permute(2, 0, 1).unsqueeze(0).to(feats.dtype)


class SlotAttention(GroupingModule):
    """Slot Attention over a dense feature map; ``iters`` = T refinement iterations.

    ``dim_in``: feature channels D; ``dim_slot``: slot size (default D); ``hidden``: width of the
    residual MLP (default 2 * dim_slot, 64 -> 128 in Sec. 5.1).
    """

    def __init__(
        self,
        dim_in: int,
        num_slots: int,
        dim_slot: int | None = None,
        iters: int = 3,
        hidden: int | None = None,
        eps: float = 1e-8,
        pos_embed: bool = True,
    ) -> None:
        super().__init__()
        if iters < 0 or num_slots < 1:
            raise ValueError(f"SlotAttention: need iters >= 0 and num_slots >= 1, got {iters}, {num_slots}")
        dim_slot = dim_slot or dim_in
        hidden = hidden or 2 * dim_slot
        self.num_slots, self.dim_in, self.dim_slot = num_slots, dim_in, dim_slot
        self.iters, self.eps = iters, eps
        self.scale = dim_slot**-0.5
        self.pos = SoftPositionEmbed(dim_in) if pos_embed else None
        self.norm_inputs = nn.LayerNorm(dim_in)
        self.norm_slots = nn.LayerNorm(dim_slot)
        self.norm_mlp = nn.LayerNorm(dim_slot)
        self.to_q = nn.Linear(dim_slot, dim_slot, bias=False)
        self.to_k = nn.Linear(dim_in, dim_slot, bias=False)
        self.to_v = nn.Linear(dim_in, dim_slot, bias=False)
        self.gru = nn.GRUCell(dim_slot, dim_slot)
        self.mlp = nn.Sequential(nn.Linear(dim_slot, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim_slot))
        self._init_slots()

    def _init_slots(self) -> None:
        # Learned Gaussian initialisation; glorot-uniform as the reference implementation.
        limit = math.sqrt(6.0 / (1 + self.dim_slot))
        self.slots_mu = nn.Parameter(torch.empty(1, 1, self.dim_slot).uniform_(-limit, limit))
        self.slots_log_sigma = nn.Parameter(torch.empty(1, 1, self.dim_slot).uniform_(-limit, limit))

    # -- initialisation --------------------------------------------------------------------------
    def sample_noise(self, batch_size: int, device: torch.device | None = None) -> Tensor:
        """A ``(B, S, D')`` standard-normal draw for the Gaussian initialisation."""
        return torch.randn(batch_size, self.num_slots, self.dim_slot, device=device or self.slots_mu.device)

    def initial_slots(self, batch_size: int, noise: Tensor | None = None) -> Tensor:
        """``mu + exp(log_sigma) * noise``: ``(B, S, D')``."""
        if noise is None:
            noise = self.sample_noise(batch_size)
        if noise.shape != (batch_size, self.num_slots, self.dim_slot):
            raise ValueError(
                f"SlotAttention: noise must be {(batch_size, self.num_slots, self.dim_slot)}, got {tuple(noise.shape)}"
            )
        return self.slots_mu + self.slots_log_sigma.exp() * noise.to(self.slots_mu.dtype)

    # -- the iteration -----------------------------------------------------------------------------
    def inputs(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """Position embedding, LayerNorm and key/value projections: ``(B, D, h, w) -> k, v (B, N, D')``."""
        self.check_input(feats)
        x = self.pos(feats) if self.pos is not None else feats
        tokens = self.norm_inputs(x.flatten(2).transpose(1, 2))
        return self.to_k(tokens), self.to_v(tokens)

    def step(self, slots: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One iteration of Algorithm 1: ``slots (B, S, D') -> (new slots, attn (B, S, N), logits (B, S, N))``.

        ``attn`` is the softmax over slots (it sums to 1 over S for every pixel); the values are
        aggregated by the attention-weighted *mean* after adding ``eps``.
        """
        b, s, d = slots.shape
        q = self.to_q(self.norm_slots(slots))
        logits, attn, updates = self._attend(q, k, v)
        # The GRU is a network layer: it takes the slots' dtype (autocast's choice), not float32.
        updates = updates.to(slots.dtype)
        new = self.gru(updates.reshape(b * s, d), slots.reshape(b * s, d)).view(b, s, d)
        new = new + self.mlp(self.norm_mlp(new))
        return new, attn, logits

    def _attend(self, q: Tensor, k: Tensor, v: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Algorithm 1's attention in float32: ``logits = k·qᵀ/√D'`` ``(B, S, N)``, their softmax over
        slots, and the updates, the ``eps``-offset weighted mean of the values ``(B, S, D')`` (None
        without ``v``). Under autocast the competition between slots and the means would otherwise
        be computed in half precision, whatever the inputs' dtype."""
        with torch.autocast(k.device.type, enabled=False):
            logits = torch.einsum("bnd,bsd->bsn", k.float(), q.float()) * self.scale
            attn = logits.softmax(dim=1)
            if v is None:
                return logits, attn, None
            weights = attn + self.eps
            weights = weights / weights.sum(dim=-1, keepdim=True)
            return logits, attn, torch.einsum("bsn,bnd->bsd", weights, v.float())

    def iterate(self, slots: Tensor, k: Tensor, v: Tensor, iters: int) -> tuple[Tensor, Tensor, Tensor]:
        """``iters`` applications of :meth:`step`; returns the last slots, attention and logits."""
        attn = logits = None
        for _ in range(iters):
            slots, attn, logits = self.step(slots, k, v)
        if attn is None:  # T = 0: the readout of the initial slots
            logits, attn, _ = self._attend(self.to_q(self.norm_slots(slots)), k, None)
        return slots, attn, logits

    def output(self, slots: Tensor, attn: Tensor, logits: Tensor, k: Tensor, hw: tuple[int, int]) -> GroupingOutput:
        """Pack the result; ``similarity`` compares the keys with the queries of the final slots."""
        q = self.to_q(self.norm_slots(slots))
        return GroupingOutput(
            slots=slots,
            assign=attn.unflatten(2, hw),
            logits=logits.unflatten(2, hw),
            similarity=pixel_slot_cosine(k, q, hw),
        )

    def run(self, feats: Tensor, slots: Tensor) -> GroupingOutput:
        """Slot Attention from the given initial slots ``(B, S, D')`` (T iterations)."""
        k, v = self.inputs(feats)
        slots, attn, logits = self.iterate(slots, k, v, self.iters)
        return self.output(slots, attn, logits, k, tuple(feats.shape[-2:]))

    def forward(self, feats: Tensor, noise: Tensor | None = None) -> GroupingOutput:
        """``feats (B, D, h, w)`` -> slots from the learned Gaussian initialisation."""
        return self.run(feats, self.initial_slots(feats.shape[0], noise))


@register_grouping("slot_attention")
def build_slot_attention(cfg: ModelConfig, dim: int) -> SlotAttention:
    """``model.grouping: slot_attention`` (paper 003): ``model.num_prototypes`` slots of size ``dim``,
    ``model.slot_iters`` iterations, offset ``model.slot_eps``, position embedding ``model.slot_pos_embed``."""
    return SlotAttention(dim, cfg.num_prototypes, iters=cfg.slot_iters, eps=cfg.slot_eps, pos_embed=cfg.slot_pos_embed)


__all__ = ["SlotAttention", "SoftPositionEmbed", "build_slot_attention"]
