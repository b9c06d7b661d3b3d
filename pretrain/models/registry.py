"""The grouping-module registry: ``model.grouping`` names a factory ``(cfg, dim) -> nn.Module``.

A grouping module lives in one file under ``pretrain/models/`` and registers its factory there::

    @register_grouping("slot_attention")
    def build_slot_attention(cfg: ModelConfig, dim: int) -> SlotAttention: ...

``pretrain/models/__init__.py`` imports every such file, so importing the package registers them all.
A factory returns either a :class:`~pretrain.models.grouping.GroupingModule` (``forward(feats,
noise) -> GroupingOutput``; every method can use it) or a module with SlotCon's narrower protocol
``z -> (slots, logits)`` (SlotCon's prototypes; methods that need a ``GroupingOutput`` refuse it).
This file depends on nothing else in the project, so the model files import it without a circle;
``pretrain.methods.registry`` re-exports these names and holds the method registry.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from torch import nn

if TYPE_CHECKING:  # only for annotations: pretrain.methods imports this package
    from ..methods.config import ModelConfig

GroupingFactory = Callable[["ModelConfig", int], nn.Module]
F = TypeVar("F", bound=Callable)

GROUPINGS: dict[str, GroupingFactory] = {}


def register(table: dict[str, Callable], kind: str, name: str) -> Callable[[F], F]:
    """Decorator adding its function to ``table`` under ``name``; a name is registered once only."""

    def deco(fn: F) -> F:
        if name in table:
            raise ValueError(f"{kind} {name!r} is already registered")
        table[name] = fn
        return fn

    return deco


def register_grouping(name: str) -> Callable[[F], F]:
    """Decorator registering ``factory(cfg, dim) -> nn.Module`` as ``model.grouping: name``."""
    return register(GROUPINGS, "grouping", name)


__all__ = ["GROUPINGS", "GroupingFactory", "register", "register_grouping"]
