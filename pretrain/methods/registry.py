"""Registries of methods and grouping modules, selected by name from ``ModelConfig``.

One file per method or grouping module, registering itself with a decorator; importing the
package (``pretrain.methods``, which imports ``pretrain.models``) registers them all::

    @register_method("objglobal")                 # pretrain/methods/objglobal.py
    def build_objglobal(cfg: ModelConfig) -> nn.Module: ...

    @register_grouping("slot_attention")          # pretrain/models/slot_attention.py
    def build_slot_attention(cfg: ModelConfig, dim: int) -> SlotAttention: ...

The grouping registry is :mod:`pretrain.models.registry` (re-exported here): a grouping factory
returns the raw module, and each method adapts it to what it needs (SlotCon wraps a
``GroupingModule`` in ``SlotConGrouping``; objglobal refuses a module without ``GroupingOutput``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from ..models.grouping import GroupingModule
from ..models.registry import GROUPINGS, GroupingFactory, register, register_grouping
from .config import ModelConfig

MethodFactory = Callable[[ModelConfig], nn.Module]
F = TypeVar("F", bound=Callable)

METHODS: dict[str, MethodFactory] = {}


def register_method(name: str) -> Callable[[F], F]:
    """Decorator registering ``factory(cfg) -> nn.Module`` as ``model.method: name``."""
    return register(METHODS, "method", name)


def build_method(cfg: ModelConfig) -> nn.Module:
    """Build the method named by ``cfg.method`` (see docs/contracts.md, Method API)."""
    if cfg.method not in METHODS:
        raise ValueError(f"model.method: unknown method {cfg.method!r}; registered: {sorted(METHODS)}")
    return METHODS[cfg.method](cfg)


def build_grouping(cfg: ModelConfig, dim: int) -> nn.Module:
    """Build the grouping module named by ``cfg.grouping`` on ``dim``-dimensional projections.

    Returns what the factory built: a ``GroupingModule`` or a module of SlotCon's protocol.
    """
    if cfg.grouping not in GROUPINGS:
        raise ValueError(f"model.grouping: unknown grouping {cfg.grouping!r}; registered: {sorted(GROUPINGS)}")
    return GROUPINGS[cfg.grouping](cfg, dim)


def build_grouping_module(
    name: str, dim_in: int, num_slots: int, *, iters: int = 3, eps: float = 1e-8, pos_embed: bool = True
) -> nn.Module:
    """The registered grouping ``name`` with ``num_slots`` slots, without a full config (tests, notebooks).

    The other ``model.*`` fields keep their defaults; ``iters``, ``eps``, ``pos_embed`` are
    ``model.slot_iters``, ``model.slot_eps``, ``model.slot_pos_embed``.
    """
    cfg = ModelConfig(grouping=name, num_prototypes=num_slots, slot_iters=iters, slot_eps=eps, slot_pos_embed=pos_embed)
    return build_grouping(cfg, dim_in)


def build_grouping_output_module(cfg: ModelConfig, dim: int, method: str) -> GroupingModule:
    """:func:`build_grouping` for a method that needs ``forward(feats, noise) -> GroupingOutput``.

    Raises a ``ValueError`` naming ``model.grouping`` when the registered module has only SlotCon's
    ``z -> (slots, logits)`` protocol (SlotCon's prototypes).
    """
    module = build_grouping(cfg, dim)
    if not isinstance(module, GroupingModule):
        raise ValueError(
            f"model.grouping: the {method} method needs a GroupingModule (forward(feats, noise) -> GroupingOutput); "
            f"{cfg.grouping!r} builds {type(module).__name__}, which has only SlotCon's (slots, logits) protocol"
        )
    return module


__all__ = [
    "METHODS", "GROUPINGS", "MethodFactory", "GroupingFactory", "register_method", "register_grouping",
    "build_method", "build_grouping", "build_grouping_module", "build_grouping_output_module",
]
