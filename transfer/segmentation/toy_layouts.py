"""Toy scenes written in the real VOC / Cityscapes / ADE20K layouts (CPU tests and smoke runs).

Images and labels come from ``pretrain.data.toy_scenes.render_scene``; each writer lays them out
exactly as the protocol's dataset class reads them, with that dataset's label convention:

* VOC: class id (0 = background) in ``SegmentationClass`` / ``SegmentationClassAug``;
* Cityscapes: the class id as ``labelTrainId`` (0..5 of 19);
* ADE20K: class id + 1 (mmseg reduces zero: 0 is "ignore", so background becomes class 0).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pretrain.data.toy_scenes import render_scene


def _scenes(n: int, size: int | tuple[int, int], seed: int, split: int):
    for i in range(n):
        rng = np.random.default_rng([seed, split, i])
        image, semantic, _, _ = render_scene(rng, size)
        yield i, image, semantic


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_voc(root: str | Path, n_train: int = 4, n_aug: int = 4, n_val: int = 2, size: int = 64, seed: int = 0) -> Path:
    """``root/VOCdevkit/VOC2012`` with JPEGImages, SegmentationClass(+Aug), ImageSets/Segmentation/{train,aug,val}.txt."""
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    for split, (n, seg_dir, sid) in {"train": (n_train, "SegmentationClass", 0), "aug": (n_aug, "SegmentationClassAug", 1),
                                     "val": (n_val, "SegmentationClass", 2)}.items():
        names = []
        for i, image, semantic in _scenes(n, size, seed, sid):
            name = f"2007_{sid}{i:05d}"
            _save(voc / "JPEGImages" / f"{name}.jpg", image)
            _save(voc / seg_dir / f"{name}.png", semantic)
            names.append(name)
        (sets / f"{split}.txt").write_text("".join(n + "\n" for n in names))
    return voc


def make_cityscapes(root: str | Path, n_train: int = 4, n_val: int = 2, size: tuple[int, int] = (96, 48), seed: int = 0) -> Path:
    """``root/cityscapes`` with leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and gtFine/.../*_gtFine_labelTrainIds.png."""
    city = Path(root) / "cityscapes"
    for sid, (split, n, town) in enumerate((("train", n_train, "aachen"), ("val", n_val, "frankfurt"))):
        for i, image, semantic in _scenes(n, size, seed, sid):
            stem = f"{town}_{i:06d}_000019"
            _save(city / "leftImg8bit" / split / town / f"{stem}_leftImg8bit.png", image)
            _save(city / "gtFine" / split / town / f"{stem}_gtFine_labelTrainIds.png", semantic)
    return city


def make_ade20k(root: str | Path, n_train: int = 4, n_val: int = 2, size: int = 64, seed: int = 0) -> Path:
    """``root/ade/ADEChallengeData2016`` with images/{training,validation}/*.jpg, annotations/.../*.png."""
    ade = Path(root) / "ade" / "ADEChallengeData2016"
    for sid, (split, n) in enumerate((("training", n_train), ("validation", n_val))):
        for i, image, semantic in _scenes(n, size, seed, sid):
            stem = f"ADE_{'train' if sid == 0 else 'val'}_{i:08d}"
            _save(ade / "images" / split / f"{stem}.jpg", image)
            _save(ade / "annotations" / split / f"{stem}.png", (semantic + 1).astype(np.uint8))
    return ade
