"""Encoder variants of the pretraining library that mmseg's ``ResNet`` cannot express, registered for mmseg.

``model.stem_pool=false`` in pretraining drops the stem's max-pool (for small images): the weights are
a plain ResNet's, but a standard ResNet built from them runs every stage at half the resolution the
filters were trained at. ``ResNetStemVariant`` is mmseg's ``ResNet`` with that switch, so the
fine-tuned network is the pretrained one; ``python -m transfer.segmentation`` selects it from the
converted file's meta (``encoder.stem_pool``).
"""
from __future__ import annotations

from mmseg.models.backbones import ResNet
from mmseg.registry import MODELS
from torch import nn


@MODELS.register_module()
class ResNetStemVariant(ResNet):
    """mmseg ``ResNet``; ``stem_pool=False`` replaces the stem's max-pool by the identity (keys unchanged)."""

    def __init__(self, stem_pool: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stem_pool = stem_pool
        if not stem_pool:
            self.maxpool = nn.Identity()


def carry_encoder_variant(backbone_cfg: dict, encoder: dict) -> str | None:
    """Make ``backbone_cfg`` (a config's ``model.backbone``, edited in place) build the pretrained encoder.

    ``encoder`` is the converted file's ``meta["encoder"]`` (``{"stem_pool": bool, ...}``; empty for files
    that do not record it). Returns a line for the log when the config was changed, else None.
    """
    stem_pool = encoder.get("stem_pool")
    if stem_pool is None or backbone_cfg.get("type") not in ("ResNet", "ResNetStemVariant"):
        return None
    current = bool(backbone_cfg.get("stem_pool", True)) if backbone_cfg.get("type") == "ResNetStemVariant" else True
    if current == bool(stem_pool):
        return None
    backbone_cfg["type"] = "ResNetStemVariant"
    backbone_cfg["stem_pool"] = bool(stem_pool)
    return (f"the weights come from an encoder with stem_pool={bool(stem_pool)}: building model.backbone as "
            f"ResNetStemVariant(stem_pool={bool(stem_pool)}) so every stage runs at the resolution it was trained at")
