"""Evaluation: unsupervised semantic segmentation (SlotCon Sec. 4.4), object discovery metrics
(ARI-FG, Otsu-matched mIoU, mBO), prototype retrieval (Sec. 4.6), slot pictures, and the online
evaluation during pretraining (``online``, its curve: ``python -m pretrain.eval.curves``).

Command line: ``python -m pretrain.eval {unsup_seg|discovery|retrieval} CKPT DATA``. The names
below are imported lazily, so ``pretrain.eval.visualize`` (used by the trainer) stays light.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "evaluate_unsup_seg": "unsup_seg",
    "evaluate_discovery": "discovery",
    "retrieve_segments": "retrieval",
    "save_retrieval_grids": "retrieval",
    "overlay_assignments": "visualize",
    "load_method": "inference",
    "ToySemantic": "datasets",
    "ToyInstances": "datasets",
    "CocoStuff27": "cocostuff",
    "HeldOutSplit": "datasets",
    "evaluate_online": "online",
    "evaluate_teacher": "online",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
