"""Evaluation datasets: images with per-pixel labels, resized and cropped for inference.

Every dataset here yields ``{"image": (3,R,R) float32 ImageNet-normalised, "label": (R,R) int64,
"index": int}``; ``label`` holds semantic classes (``IGNORE_INDEX`` = unlabelled) or instance ids
(0 = background), depending on the reader.

* :class:`ToySemantic` / :class:`ToyInstances`: the toy scenes (docs/contracts.md layout),
  ``semantic/<split>/*.png`` and ``instances/<split>/*.png``.
* :class:`pretrain.eval.cocostuff.CocoStuff27`: COCO-Stuff with the 27 coarse classes.
* :class:`HeldOutSplit`: the online evaluation's split, with whatever masks its layout has (semantic
  and instance labels together, so one pass scores every metric).
"""
from __future__ import annotations

import contextlib
import io
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
    img, labels = resize_crop_labels(image, [label], resolution)
    return img, labels[0]


def resize_crop_labels(image: Image.Image, labels: list[np.ndarray | None], resolution: int | None
                       ) -> tuple[Tensor, list[Tensor | None]]:
    """:func:`resize_crop` with several label maps of the image (``None`` entries stay ``None``)."""
    img = TF.to_tensor(image)
    out: list[Tensor | None] = []
    for label in labels:
        lab = None if label is None else torch.from_numpy(np.ascontiguousarray(label)).long()
        if lab is not None and tuple(lab.shape) != tuple(img.shape[-2:]):
            raise ValueError(f"image size {tuple(img.shape[-2:])} and label size {tuple(lab.shape)} differ")
        if lab is not None and resolution is not None:
            lab = TF.resize(lab[None], resolution, interpolation=TF.InterpolationMode.NEAREST)
            lab = TF.center_crop(lab, [resolution, resolution])[0]
        out.append(lab)
    if resolution is not None:
        img = TF.resize(img, resolution, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        img = TF.center_crop(img, [resolution, resolution])
    img = TF.normalize(img, IMAGENET_MEAN, IMAGENET_STD)
    return img, out


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


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
COCO_RESOLUTION = 320  # SlotCon Sec. 4.4 (PiCIE's protocol): shorter side 320, centre crop


def _coco_instance_maps(json_path: Path) -> tuple[dict[str, dict], object]:
    """``{file name: image record}`` of a COCO instances JSON and its ``pycocotools`` index."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its loading times
        coco = COCO(str(json_path))
    return {im["file_name"]: im for im in coco.dataset.get("images", [])}, coco


class HeldOutSplit(Dataset):
    """The held-out images of the online evaluation, with the masks their layout provides.

    ``split_dir`` is a folder of images; its parent ``root`` (or the grandparent, for COCO-Stuff's
    ``images/<split>``) decides what is scored:

    * toy scenes (``root/meta.json``): ``semantic/<split>`` (classes from ``meta.json``, background
      included) and ``instances/<split>`` PNGs;
    * COCO: instance masks from ``root/annotations/instances_<split>.json`` (crowd regions count as
      background, so FG-ARI and mBO skip them; a later, smaller object is drawn over a larger one);
      the 27 COCO-Stuff classes when ``root/annotations/<split>/`` holds stuffthingmaps PNGs and
      ``root/annotations/stuff_<split>.json`` their categories (:mod:`pretrain.eval.cocostuff`);
    * anything else: images alone (prototype health only).

    Items: ``{"image", "semantic", "instances", "index"}``; ``semantic`` is all ``IGNORE_INDEX`` and
    ``instances`` all 0 where the layout has none (``has_semantic`` / ``has_instances`` say which).
    ``resolution=0`` is the layout's default: native for toy scenes, :data:`COCO_RESOLUTION` elsewhere.
    """

    def __init__(self, split_dir: str | Path, resolution: int = 0, max_images: int = 0) -> None:
        split_dir = Path(split_dir)
        if not split_dir.is_dir():
            raise FileNotFoundError(f"held-out split {split_dir} not found")
        name = split_dir.name
        root = split_dir.parent.parent if split_dir.parent.name == "images" else split_dir.parent
        self.split_dir, self.root = split_dir, root
        self.class_names: list[str] = []
        self.remap: np.ndarray | None = None
        self.semantic: list[Path] | None = None
        self.instances: list[Path] | None = None
        self._coco = None
        self._coco_images: dict[str, dict] = {}
        toy = (root / "meta.json").is_file()
        if toy:
            images, self.semantic = _toy_pairs(root, name, "semantic")
            _, self.instances = _toy_pairs(root, name, "instances")
            self.class_names = _toy_classes(root)
        else:
            images = sorted(p for p in split_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            inst_json = root / "annotations" / f"instances_{name}.json"
            if inst_json.is_file():
                self._coco_images, self._coco = _coco_instance_maps(inst_json)
                images = [p for p in images if p.name in self._coco_images]
            stuff_dir, stuff_json = root / "annotations" / name, root / "annotations" / f"stuff_{name}.json"
            if stuff_dir.is_dir() and stuff_json.is_file():
                from .cocostuff import coarse_classes, label_table, load_categories

                jsons = [j for j in (inst_json, stuff_json) if j.is_file()]
                self.class_names, fine_to_coarse = coarse_classes(load_categories(jsons))
                self.remap = label_table(fine_to_coarse)
                images = [p for p in images if (stuff_dir / f"{p.stem}.png").is_file()]
                self.semantic = [stuff_dir / f"{p.stem}.png" for p in images]
        if max_images:
            images = images[:max_images]
            self.semantic = None if self.semantic is None else self.semantic[:max_images]
            self.instances = None if self.instances is None else self.instances[:max_images]
        if not images:
            raise ValueError(f"held-out split {split_dir} has no images (with masks, where its layout has them)")
        self.images = images
        self.resolution: int | None = (None if toy else COCO_RESOLUTION) if resolution == 0 else resolution

    @property
    def has_semantic(self) -> bool:
        return self.semantic is not None

    @property
    def has_instances(self) -> bool:
        return self.instances is not None or self._coco is not None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def _instance_map(self, index: int) -> np.ndarray | None:
        if self.instances is not None:
            return load_label(self.instances[index])
        if self._coco is None:
            return None
        rec = self._coco_images[self.images[index].name]
        out = np.zeros((int(rec["height"]), int(rec["width"])), dtype=np.int64)
        anns = self._coco.loadAnns(self._coco.getAnnIds(imgIds=rec["id"], iscrowd=None))
        # larger objects first, so that a small object lying on a large one stays visible
        for k, ann in enumerate(sorted(anns, key=lambda a: -float(a.get("area", 0.0))), start=1):
            mask = self._coco.annToMask(ann).astype(bool)
            out[mask] = 0 if ann.get("iscrowd", 0) else k
        return out

    def __getitem__(self, index: int) -> dict:
        image = load_rgb(self.images[index])
        sem = None
        if self.semantic is not None:
            sem = load_label(self.semantic[index])
            if self.remap is not None:
                if sem.max() >= len(self.remap):
                    raise ValueError(f"{self.semantic[index]}: value {sem.max()} outside the label table")
                sem = self.remap[sem]
        img, (sem_t, inst_t) = resize_crop_labels(image, [sem, self._instance_map(index)], self.resolution)
        shape = tuple(img.shape[-2:])
        return {"image": img,
                "semantic": sem_t if sem_t is not None else torch.full(shape, IGNORE_INDEX, dtype=torch.long),
                "instances": inst_t if inst_t is not None else torch.zeros(shape, dtype=torch.long),
                "index": index}


def collate_held_out(items: list[dict]) -> dict:
    """Stack :class:`HeldOutSplit` items into a batch dict."""
    return {k: (torch.tensor([it[k] for it in items], dtype=torch.long) if k == "index"
                else torch.stack([it[k] for it in items])) for k in items[0]}


def collate(items: list[dict]) -> dict:
    """Stack a list of dataset items into a batch dict."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "label": torch.stack([it["label"] for it in items]),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }
