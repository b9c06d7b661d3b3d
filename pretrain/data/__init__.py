"""Pretraining data: datasets, two-view augmentation with crop boxes, PIL and FFCV loaders,
and the toy scenes (docs/contracts.md, Data API)."""
from __future__ import annotations

from typing import Any

from .config import DataConfig

__all__ = ["DataConfig", "build_pretrain_loader"]


def __getattr__(name: str) -> Any:
    # Lazy: `pretrain.data.toy_scenes` and the config must not pull in torch/numba/ffcv.
    if name == "build_pretrain_loader":
        from .loader import build_pretrain_loader

        return build_pretrain_loader
    raise AttributeError(name)
