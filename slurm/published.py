"""SlotCon's published transfer results (Wen et al., NeurIPS 2022), for `python -m slurm collect`.

Transcribed from /work/shared/papers/004_76575b5e20638648.txt: Table 2 (COCO pre-training, row
"Ours (SlotCon)") and Table 3 (COCO, ImageNet-1K 100/200 epochs, COCO+). Detection and instance
segmentation: Mask R-CNN R50-FPN 1x on COCO (AP^b, AP^m); semantic segmentation: FCN, mIoU on
Cityscapes, PASCAL VOC and ADE20K (Sec. 4.2). In the text extraction of Table 3 the COCO+ row of
SlotCon shares its line with ORL's, which has no segmentation numbers; the three mIoU values on
that line (76.5, 73.9, 39.2) are therefore SlotCon's.
"""
from __future__ import annotations

#: metric name -> (label, transfer task that produces it)
METRICS = {
    "AP_b": ("AP^b (COCO det)", "det"),
    "AP_m": ("AP^m (COCO inst. seg)", "det"),
    "mIoU_cityscapes": ("mIoU City.", "cityscapes"),
    "mIoU_voc": ("mIoU VOC", "voc"),
    "mIoU_ade20k": ("mIoU ADE", "ade20k"),
}

#: setting -> metric -> value (percent)
SLOTCON = {
    "coco_800ep": {"AP_b": 41.0, "AP_m": 37.0, "mIoU_cityscapes": 76.2, "mIoU_voc": 71.6, "mIoU_ade20k": 39.0},
    "imagenet_100ep": {"AP_b": 41.4, "AP_m": 37.2, "mIoU_cityscapes": 75.4, "mIoU_voc": 73.1, "mIoU_ade20k": 38.6},
    "imagenet_200ep": {"AP_b": 41.8, "AP_m": 37.8, "mIoU_cityscapes": 76.3, "mIoU_voc": 75.0, "mIoU_ade20k": 38.8},
    "cocoplus_800ep": {"AP_b": 41.8, "AP_m": 37.8, "mIoU_cityscapes": 76.5, "mIoU_voc": 73.9, "mIoU_ade20k": 39.2},
}


def setting_of(config_path: str) -> str | None:
    """The published setting a pretraining config reproduces, from its file name (None if none)."""
    name = config_path.rsplit("/", 1)[-1].lower()
    for data in ("cocoplus", "imagenet", "coco"):
        if data in name:
            for ep in ("800ep", "200ep", "100ep"):
                if ep in name and f"{data}_{ep}" in SLOTCON:
                    return f"{data}_{ep}"
    return None
