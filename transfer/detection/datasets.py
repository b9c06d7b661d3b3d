"""Register COCO train2017/val2017 (standard layout) with Detectron2 under the names the configs use.

Layout under ``root`` (the toy scenes use the same one, docs/contracts.md)::

    annotations/instances_train2017.json   annotations/instances_val2017.json
    train2017/*.jpg                        val2017/*.jpg
"""
from __future__ import annotations

import os
from pathlib import Path

import transfer.detection.compat  # noqa: F401  (before Detectron2)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

TRAIN_NAME = "coco_2017_train"
VAL_NAME = "coco_2017_val"
_SPLITS = {TRAIN_NAME: "train2017", VAL_NAME: "val2017"}


def default_data_root() -> str:
    """``$DETECTRON2_DATASETS/coco`` (Detectron2's convention), else ``datasets/coco``."""
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "coco")


def coco_paths(root: str | Path) -> dict[str, tuple[Path, Path]]:
    """Dataset name -> (annotation json, image folder); raises FileNotFoundError naming every missing path."""
    root = Path(root)
    paths = {
        name: (root / "annotations" / f"instances_{split}.json", root / split) for name, split in _SPLITS.items()
    }
    missing = [str(p) for json_file, images in paths.values() for p in (json_file, images) if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"COCO data root {root} lacks: {', '.join(missing)}. Expected the standard layout "
            "annotations/instances_{train,val}2017.json, train2017/, val2017/ (pass --data-root)."
        )
    return paths


def register_coco(root: str | Path) -> tuple[str, str]:
    """Register train/val from ``root`` as ``coco_2017_train`` / ``coco_2017_val``; return the names.

    Detectron2 pre-registers these names at a fixed path (``$DETECTRON2_DATASETS``); they are
    replaced so that ``--data-root`` decides which files are read. Idempotent within a process.
    """
    for name, (json_file, images) in coco_paths(root).items():
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, str(json_file), str(images))
    return TRAIN_NAME, VAL_NAME
