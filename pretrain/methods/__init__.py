"""Pretraining methods: ``build_method(cfg)`` picks one by ``cfg.method`` from the registry.

To add a method or grouping module: decorate its factory with ``register_method`` /
``register_grouping`` (from ``pretrain.methods.registry``) and import its module below.
"""
from .config import ModelConfig
from .registry import GROUPINGS, METHODS, build_grouping, build_method, register_grouping, register_method

# Importing a method module registers it.
from . import slotcon  # noqa: E402,F401  isort: skip
from . import groupings, objglobal  # noqa: E402,F401  isort: skip  (issue 9: object-centric family)

__all__ = [
    "ModelConfig", "METHODS", "GROUPINGS", "build_method", "build_grouping", "register_method", "register_grouping",
]
