"""Encoder variants of the pretraining library for Detectron2, and the config key that selects them.

``model.stem_pool=false`` in pretraining drops the stem's max-pool (for small images). The weights are a
plain ResNet's, but Detectron2's ``BasicStem`` always pools, so the standard backbone would run every
stage at half the resolution its filters were trained at. ``MODEL.RESNETS.STEM_POOL False`` with
``MODEL.BACKBONE.NAME build_resnet_fpn_backbone_stem_variant`` builds the pretrained network itself;
every stage's stride halves, and the FPN names its levels by their true strides (an FPN on res2..res5
gives p1..p5; on res3..res5 the usual p2..p5), which the config's ``RPN.IN_FEATURES`` /
``ROI_HEADS.IN_FEATURES`` must use.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN, build_resnet_backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicStem

VARIANT_BACKBONE = "build_resnet_fpn_backbone_stem_variant"


def add_stem_pool_key(cfg: CfgNode) -> None:
    """Add ``MODEL.RESNETS.STEM_POOL`` (default True: Detectron2's own stem) to a fresh config."""
    if "STEM_POOL" not in cfg.MODEL.RESNETS:
        cfg.MODEL.RESNETS.STEM_POOL = True


class StemWithoutPool(BasicStem):
    """Detectron2's stem without the max-pool: conv 7x7 stride 2, norm, ReLU (stride 2)."""

    def __init__(self, stem: BasicStem) -> None:
        super().__init__(stem.in_channels, stem.out_channels)
        self.conv1 = stem.conv1  # the built (and possibly frozen) conv + norm, same keys
        self.stride = 2

    def forward(self, x):  # noqa: D102
        return F.relu_(self.conv1(x))


@BACKBONE_REGISTRY.register()
def build_resnet_fpn_backbone_stem_variant(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """``build_resnet_fpn_backbone`` honouring ``MODEL.RESNETS.STEM_POOL``."""
    bottom_up = build_resnet_backbone(cfg, input_shape)
    if not cfg.MODEL.RESNETS.STEM_POOL:
        bottom_up.stem = StemWithoutPool(bottom_up.stem)
        # ResNet derived every stage's stride from the pooling stem's 4; each is half that now.
        bottom_up._out_feature_strides = {k: v // 2 for k, v in bottom_up._out_feature_strides.items()}
    top = LastLevelMaxPool()
    # The extra level pools the coarsest FPN output, which is named by its stride ("p5" only when pooling).
    top.in_feature = f"p{int(math.log2(bottom_up._out_feature_strides[cfg.MODEL.FPN.IN_FEATURES[-1]]))}"
    return FPN(bottom_up=bottom_up, in_features=cfg.MODEL.FPN.IN_FEATURES, out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
               norm=cfg.MODEL.FPN.NORM, top_block=top, fuse_type=cfg.MODEL.FPN.FUSE_TYPE)


def check_stem(cfg: CfgNode, weights_stem_pool: bool | None, weights: str) -> None:
    """Refuse a config whose stem differs from the encoder the weights were trained in (or cannot build one).

    ``weights_stem_pool`` is the converted file's ``encoder.stem_pool`` (None: not recorded, e.g. a
    Detectron2 checkpoint): then only the config's own consistency is checked.
    """
    want = bool(cfg.MODEL.RESNETS.STEM_POOL)
    if not want and cfg.MODEL.BACKBONE.NAME != VARIANT_BACKBONE:
        raise ValueError(f"MODEL.RESNETS.STEM_POOL False needs MODEL.BACKBONE.NAME {VARIANT_BACKBONE} "
                         f"(got {cfg.MODEL.BACKBONE.NAME})")
    if weights_stem_pool is None or weights_stem_pool == want:
        return
    if weights_stem_pool is False:
        raise ValueError(
            f"{weights} comes from an encoder without the stem max-pool (pretraining model.stem_pool=false), "
            "but the config builds Detectron2's standard stem, which would run every stage at half the "
            "resolution it was trained at. Pass MODEL.RESNETS.STEM_POOL False MODEL.BACKBONE.NAME "
            f"{VARIANT_BACKBONE} and FPN levels named by their strides (see "
            "configs/detection/mask_rcnn_R18_FPN_toy_scenes_demo.yaml)")
    raise ValueError(f"{weights} comes from an encoder with the standard stem max-pool, but the config sets "
                     "MODEL.RESNETS.STEM_POOL False")
