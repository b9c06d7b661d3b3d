"""Pretraining methods: ``build_method(cfg)`` picks one by ``cfg.method`` from the registry.

A method is one file here that subclasses ``TeacherStudentMethod`` (``base.py``) and registers its
factory with ``@register_method``; a grouping module is one file under ``pretrain/models/`` with
``@register_grouping`` (``pretrain/models/__init__.py`` imports it). Importing this package
registers every method (the imports below) and every grouping module (through ``registry``).
"""
from .config import ModelConfig
from .registry import GROUPINGS, METHODS, build_grouping, build_method, register_grouping, register_method

from . import objglobal, slotcon  # noqa: E402,F401  isort: skip  (registration)

__all__ = [
    "ModelConfig", "METHODS", "GROUPINGS", "build_method", "build_grouping", "register_method", "register_grouping",
]
