"""The toy scenes (``pretrain.data.toy_scenes``) as an MMSegmentation dataset with their own classes.

Layout read (the toy scenes' own, docs/contracts.md)::

    root/train2017/*.jpg   root/semantic/train2017/*.png   (uint8 class id, 0 = background)
    root/val2017/*.jpg     root/semantic/val2017/*.png

Registering the real class names (background, circle, ...) rather than writing the scenes into VOC's
layout keeps per-class IoUs readable and the class count right (6, not VOC's 21).
"""
from __future__ import annotations

from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS

from pretrain.data.toy_scenes import CLASS_NAMES

# One colour per class for mmseg's visualiser (background black).
_PALETTE = [[0, 0, 0], [220, 60, 60], [60, 110, 220], [60, 180, 90], [150, 80, 200], [230, 200, 50]]


@DATASETS.register_module()
class ToyScenesDataset(BaseSegDataset):
    """Semantic masks of the toy scenes: 6 classes including background (id 0), no ignored label."""

    METAINFO = dict(classes=CLASS_NAMES, palette=_PALETTE[: len(CLASS_NAMES)])

    def __init__(self, img_suffix: str = ".jpg", seg_map_suffix: str = ".png", reduce_zero_label: bool = False,
                 **kwargs) -> None:
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix,
                         reduce_zero_label=reduce_zero_label, **kwargs)
