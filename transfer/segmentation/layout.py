"""Dataset layout checks run before the mmengine Runner is built.

mmseg lists images lazily and fails mid-run (or silently trains on fewer images) when a label map is
missing; these checks read the dataset entries of the config and stop with an error naming the
missing directory, split file or files, plus the layout that dataset type expects.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from . import compat  # noqa: F401

LAYOUT_HINTS: dict[str, str] = {
    "PascalVOCDataset": (
        "VOCdevkit/VOC2012/ with JPEGImages/*.jpg, SegmentationClass/*.png (VOC2012), SegmentationClassAug/*.png "
        "(SBD masks, made by mmseg's tools/dataset_converters/voc_aug.py) and ImageSets/Segmentation/{train,aug,val}.txt; "
        "train_aug = train.txt (SegmentationClass) + aug.txt (SegmentationClassAug), 10582 images"),
    "CityscapesDataset": (
        "cityscapes/ with leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
        "gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png (labelTrainIds made by mmseg's "
        "tools/dataset_converters/cityscapes.py or cityscapesscripts' createTrainIdLabelImgs)"),
    "ToyScenesDataset": (
        "the toy scenes (python tools/make_toy_scenes.py ROOT): train2017/*.jpg, val2017/*.jpg and "
        "semantic/{train2017,val2017}/*.png (class id, 0 = background)"),
    "ADE20KDataset": (
        "ADEChallengeData2016/ with images/{training,validation}/*.jpg and annotations/{training,validation}/*.png"),
}


class DatasetLayoutError(FileNotFoundError):
    """A dataset directory, split file or image/label file the config needs is not there."""


def _defaults(ds_type: str) -> dict[str, Any]:
    from mmseg.registry import DATASETS

    cls = DATASETS.get(ds_type)
    if cls is None:
        raise DatasetLayoutError(f"unknown dataset type {ds_type!r} in the config")
    out: dict[str, Any] = {}
    for klass in cls.__mro__:
        if klass is object or "__init__" not in klass.__dict__:
            continue
        for name, p in inspect.signature(klass.__init__).parameters.items():
            if p.default is not inspect.Parameter.empty:
                out.setdefault(name, p.default)
    return out


def _join(root: str | None, sub: str | None) -> Path:
    if not sub:
        return Path(root or ".")
    return Path(sub) if root is None or os.path.isabs(sub) else Path(root) / sub


def _fail(ds_type: str, role: str, msg: str) -> DatasetLayoutError:
    hint = LAYOUT_HINTS.get(ds_type, "")
    return DatasetLayoutError(f"{role} dataset ({ds_type}): {msg}" + (f"\nexpected layout: {hint}" if hint else "")
                              + "\n(point --data-root at the dataset root)")


def check_dataset(ds: dict, role: str) -> int:
    """Check one dataset config (``ConcatDataset`` is checked member by member); return its image count."""
    ds_type = ds.get("type")
    if ds_type == "ConcatDataset":
        return sum(check_dataset(d, role) for d in ds["datasets"])
    if ds_type == "RepeatDataset":
        return check_dataset(ds["dataset"], role)
    defaults = _defaults(ds_type)
    root = ds.get("data_root")
    if root is not None and not Path(root).is_dir():
        raise _fail(ds_type, role, f"data root {root} does not exist")
    prefix = ds.get("data_prefix", {})
    img_dir = _join(root, prefix.get("img_path"))
    seg_dir = _join(root, prefix.get("seg_map_path"))
    img_suffix = ds.get("img_suffix", defaults.get("img_suffix", ".jpg"))
    seg_suffix = ds.get("seg_map_suffix", defaults.get("seg_map_suffix", ".png"))
    for d, what in ((img_dir, "image"), (seg_dir, "label")):
        if not d.is_dir():
            raise _fail(ds_type, role, f"{what} directory {d} does not exist")
    ann = ds.get("ann_file")
    if ann:
        ann_path = _join(root, ann)
        if not ann_path.is_file():
            raise _fail(ds_type, role, f"split file {ann_path} does not exist")
        names = [line.strip() for line in ann_path.read_text().splitlines() if line.strip()]
        if not names:
            raise _fail(ds_type, role, f"split file {ann_path} lists no images")
        pairs = [(img_dir / (n + img_suffix), seg_dir / (n + seg_suffix)) for n in names]
    else:
        imgs = sorted(p for p in img_dir.rglob("*" + img_suffix) if p.is_file())
        if not imgs:
            raise _fail(ds_type, role, f"no '*{img_suffix}' images under {img_dir}")
        pairs = [(p, seg_dir / (str(p.relative_to(img_dir))[: -len(img_suffix)] + seg_suffix)) for p in imgs]
    missing = [str(p) for pair in pairs for p in pair if not p.is_file()]
    if missing:
        raise _fail(ds_type, role, f"{len(missing)} of {2 * len(pairs)} image/label files missing, e.g. {missing[:5]}")
    return len(pairs)


def check_layouts(cfg: Any, roles: tuple[str, ...]) -> dict[str, int]:
    """Check the datasets of ``cfg.<role>_dataloader`` for each role; return image counts per role."""
    counts = {}
    for role in roles:
        loader = cfg.get(f"{role}_dataloader")
        if loader is None:
            continue
        counts[role] = check_dataset(loader["dataset"], role)
    return counts
