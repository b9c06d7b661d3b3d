"""MMSegmentation transfer (SlotCon Sec. 4.2): FCN on PASCAL VOC aug, Cityscapes and ADE20K.

``python -m transfer.segmentation --config configs/segmentation/<cfg>.py --weights <converted>.pth``.
Importing this package applies the MMSeg/mmcv-lite workarounds of ``compat`` (transfer code only).
"""
from . import compat  # noqa: F401
