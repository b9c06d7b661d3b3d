"""Registries of methods and grouping modules, selected by name from ``ModelConfig``.

A new method (or grouping module) registers itself with a decorator in its own file and is
imported once in ``pretrain/methods/__init__.py``::

    @register_method("objglobal")
    def build_objglobal(cfg: ModelConfig) -> nn.Module: ...

    @register_grouping("slot_attention")
    def build_slot_attention(cfg: ModelConfig, dim: int) -> nn.Module: ...

A grouping module maps projections ``(B, D, H, W)`` to ``(slots (B, K, D), logits (B, K, H, W))``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from ..models.prototypes import SemanticGrouping
from .config import ModelConfig

MethodFactory = Callable[[ModelConfig], nn.Module]
GroupingFactory = Callable[[ModelConfig, int], nn.Module]
F = TypeVar("F", bound=Callable)

METHODS: dict[str, MethodFactory] = {}
GROUPINGS: dict[str, GroupingFactory] = {}


def _register(table: dict, kind: str, name: str) -> Callable[[F], F]:
    def deco(fn: F) -> F:
        if name in table:
            raise ValueError(f"{kind} {name!r} is already registered")
        table[name] = fn
        return fn

    return deco


def register_method(name: str) -> Callable[[F], F]:
    """Decorator registering ``factory(cfg) -> nn.Module`` as ``model.method: name``."""
    return _register(METHODS, "method", name)


def register_grouping(name: str) -> Callable[[F], F]:
    """Decorator registering ``factory(cfg, dim) -> nn.Module`` as ``model.grouping: name``."""
    return _register(GROUPINGS, "grouping", name)


def build_method(cfg: ModelConfig) -> nn.Module:
    """Build the method named by ``cfg.method`` (see docs/contracts.md, Method API)."""
    if cfg.method not in METHODS:
        raise ValueError(f"model.method: unknown method {cfg.method!r}; registered: {sorted(METHODS)}")
    return METHODS[cfg.method](cfg)


def build_grouping(cfg: ModelConfig, dim: int) -> nn.Module:
    """Build the grouping module named by ``cfg.grouping`` for ``dim``-dimensional projections."""
    if cfg.grouping not in GROUPINGS:
        raise ValueError(f"model.grouping: unknown grouping {cfg.grouping!r}; registered: {sorted(GROUPINGS)}")
    return GROUPINGS[cfg.grouping](cfg, dim)


@register_grouping("prototypes")
def _build_prototypes(cfg: ModelConfig, dim: int) -> nn.Module:
    # Attentive pooling uses the teacher temperature for student and teacher (recipe, Eq. 4).
    return SemanticGrouping(cfg.num_prototypes, dim, tau_pool=cfg.tau_t, eps=cfg.pool_eps)


__all__ = [
    "METHODS", "GROUPINGS", "register_method", "register_grouping", "build_method", "build_grouping",
]
