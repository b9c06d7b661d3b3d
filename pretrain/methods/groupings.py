"""Grouping modules of the object-centric family registered for SlotCon (``model.grouping``).

``slot_attention`` (paper 003), ``qsa`` (BO-QSA, paper 001) and ``softargmax`` (paper 002) replace
SlotCon's prototypes through :class:`pretrain.models.grouping.SlotConGrouping`: their slots are
per-image prototypes and the pixel-slot cosine similarities take the place of Eq. 1's logits.
The number of slots is ``model.num_prototypes``.
"""
from __future__ import annotations

from torch import nn

from ..models.grouping import SlotConGrouping, build_grouping_module
from .config import ModelConfig
from .registry import register_grouping


def grouping_module(cfg: ModelConfig, dim: int):  # noqa: ANN201 - a GroupingModule
    """The raw grouping module of ``cfg.grouping`` on ``dim``-dimensional features."""
    return build_grouping_module(
        cfg.grouping, dim, cfg.num_prototypes, iters=cfg.slot_iters, eps=cfg.slot_eps, pos_embed=cfg.slot_pos_embed
    )


def _adapter(cfg: ModelConfig, dim: int) -> nn.Module:
    return SlotConGrouping(grouping_module(cfg, dim))


for _name in ("slot_attention", "qsa", "softargmax"):
    register_grouping(_name)(_adapter)

__all__ = ["grouping_module"]
