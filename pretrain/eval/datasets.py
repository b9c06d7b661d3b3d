"""Evaluation datasets: images with per-pixel labels, resized and cropped for inference.

Every dataset here yields ``{"image": (3,R,R) float32 ImageNet-normalised, "label": (R,R) int64,
"index": int}``; ``label`` holds semantic classes (``IGNORE_INDEX`` = unlabelled) or instance ids
(0 = background), depending on the reader.

* :class:`ToySemantic` / :class:`ToyInstances`: the toy scenes (docs/contracts.md layout),
  ``semantic/<split>/*.png`` and ``instances/<split>/*.png``.
* :class:`pretrain.eval.cocostuff.CocoStuff27`: COCO-Stuff with the 27 coarse classes.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .metrics import IGNORE_INDEX
from .visualize import IMAGENET_MEAN, IMAGENET_STD


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as RGB, with an error naming the path if it cannot be decoded."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises several types; the path is what the user needs
        raise OSError(f"cannot read image {path}: {e}") from e


def load_label(path: str | Path) -> np.ndarray:
    """Read a single-channel label PNG as ``uint8``/``int`` array (error names the path)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"label map {path} not found")
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"label map {path} has mode {im.mode}; expected a single-channel PNG")
        return np.asarray(im).astype(np.int64)


def resize_crop(image: Image.Image, label: np.ndarray | None, resolution: int | None
                ) -> tuple[Tensor, Tensor | None]:
    """Resize the shorter side to ``resolution`` and centre-crop a square (the PiCIE/SlotCon 320
    protocol); the image bilinearly, the label by nearest neighbour so no new classes appear.
    ``resolution=None`` keeps the native size. Returns a normalised image and an int64 label."""
    img = TF.to_tensor(image)
    lab = None if label is None else torch.from_numpy(np.ascontiguousarray(label)).long()
    if label is not None and tuple(lab.shape) != tuple(img.shape[-2:]):
        raise ValueError(f"image size {tuple(img.shape[-2:])} and label size {tuple(lab.shape)} differ")
    if resolution is not None:
        img = TF.resize(img, resolution, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        img = TF.center_crop(img, [resolution, resolution])
        if lab is not None:
            lab = TF.resize(lab[None], resolution, interpolation=TF.InterpolationMode.NEAREST)
            lab = TF.center_crop(lab, [resolution, resolution])[0]
    img = TF.normalize(img, IMAGENET_MEAN, IMAGENET_STD)
    return img, lab


class LabelledImages(Dataset):
    """Pairs of image files and label PNGs; ``remap`` (a lookup table) turns raw PNG values into
    classes, values it sends to ``IGNORE_INDEX`` are ignored by the metrics."""

    def __init__(self, images: list[Path], labels: list[Path], resolution: int | None,
                 class_names: list[str], remap: np.ndarray | None = None) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} label maps")
        if not images:
            raise ValueError("empty evaluation dataset")
        self.images, self.labels = list(images), list(labels)
        self.resolution = resolution
        self.class_names = list(class_names)
        self.remap = remap

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, index: int) -> Tensor:
        """The normalised image alone (for retrieval grids)."""
        return resize_crop(load_rgb(self.images[index]), None, self.resolution)[0]

    def __getitem__(self, index: int) -> dict:
        raw = load_label(self.labels[index])
        if self.remap is not None:
            if raw.max() >= len(self.remap):
                raise ValueError(f"{self.labels[index]}: value {raw.max()} outside the label table")
            raw = self.remap[raw]
        img, lab = resize_crop(load_rgb(self.images[index]), raw, self.resolution)
        return {"image": img, "label": lab, "index": index}


def _toy_pairs(root: Path, split: str, kind: str) -> tuple[list[Path], list[Path]]:
    img_dir, lab_dir = root / split, root / kind / split
    for d in (img_dir, lab_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"{d} not found: not a toy-scenes root (docs/contracts.md layout)")
    images = sorted(img_dir.glob("*.jpg"))
    labels = [lab_dir / f"{p.stem}.png" for p in images]
    missing = [str(p) for p in labels if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} label maps missing, e.g. {missing[0]}")
    return images, labels


def _toy_classes(root: Path) -> list[str]:
    meta = root / "meta.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: not a toy-scenes root")
    return list(json.loads(meta.read_text())["classes"])


class ToySemantic(LabelledImages):
    """Toy scenes with semantic labels.

    The background counts as a class by default: the toy background is a textured region a model
    must group like any other, the analogue of COCO-Stuff-27's 15 stuff classes, and leaving it
    out would let a model that merges background with objects go unpunished (pixels of the
    background would be ignored). ``ignore_background=True`` drops it (labels shift down by one).
    """

    def __init__(self, root: str | Path, split: str = "val2017", resolution: int | None = None,
                 ignore_background: bool = False) -> None:
        root = Path(root)
        names = _toy_classes(root)
        images, labels = _toy_pairs(root, split, "semantic")
        remap = None
        if ignore_background:
            remap = np.full(256, IGNORE_INDEX, dtype=np.int64)
            remap[1:len(names)] = np.arange(len(names) - 1)
            names = names[1:]
        super().__init__(images, labels, resolution, names, remap)


class ToyInstances(LabelledImages):
    """Toy scenes with instance ids (0 = background) for object discovery metrics."""

    def __init__(self, root: str | Path, split: str = "val2017", resolution: int | None = None) -> None:
        root = Path(root)
        images, labels = _toy_pairs(root, split, "instances")
        super().__init__(images, labels, resolution, ["background", "object"], None)


def collate(items: list[dict]) -> dict:
    """Stack a list of dataset items into a batch dict."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "label": torch.stack([it["label"] for it in items]),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }
