"""Toy scenes: a small, deterministic, COCO-layout dataset of textured shapes.

The project's CPU test bed and default main job. Each image is a textured background with
several occluding objects; the semantic class of an object is its shape type, and each class
has its own colour family and texture (stripes, checks, dots, noise), so a small ResNet
trained self-supervised can group pixels by class. The layout (docs/contracts.md)::

    root/train2017/*.jpg   root/val2017/*.jpg
    root/annotations/instances_{train,val}2017.json   COCO instances, RLE masks
    root/semantic/{train,val}2017/*.png              uint8 class id, 0 = background
    root/instances/{train,val}2017/*.png             uint8 instance id, 0 = background
    root/meta.json                                   class names, seed, sizes

Every image is rendered from its own generator seeded by ``(seed, split, index)``, so an image
does not depend on how many others were made, and the whole set is reproducible.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# Bumped whenever rendering changes, so stale datasets on disk are regenerated.
TOY_VERSION = 2
CLASS_NAMES: tuple[str, ...] = ("background", "circle", "square", "triangle", "ellipse", "star")
_SPLITS = ("train2017", "val2017")
# An object occluded down to fewer visible pixels than this is repainted with the background:
# such slivers cannot be annotated meaningfully, and keeping them unannotated would make the
# image disagree with its label maps.
_MIN_VISIBLE_PX = 12
# Objects per scene [lo, hi) and radius range as a fraction of the image side. Chosen so that the
# background covers about half of the pixels (48 %, each shape class 8-15 %): with version 1's 3-6
# smaller shapes it covered 75 %, so labelling every pixel "background" already scored 12.6
# one-to-one mIoU over the 6 classes, which is what a random network mostly does, and the
# balancing of SlotCon's centering split that background over several prototypes.
_N_OBJECTS = (7, 11)
_RADIUS = (0.16, 0.28)


@dataclass(frozen=True)
class _ClassStyle:
    hue: tuple[float, float]  # hue range in [0, 1)
    texture: str  # stripes | checks | dots | noise | solid


# Class-consistent colour families and textures: the signal a self-supervised model can group.
_STYLES: dict[int, _ClassStyle] = {
    1: _ClassStyle((0.97, 1.05), "solid"),  # circle: reds
    2: _ClassStyle((0.55, 0.65), "checks"),  # square: blues
    3: _ClassStyle((0.28, 0.38), "stripes"),  # triangle: greens
    4: _ClassStyle((0.76, 0.86), "dots"),  # ellipse: purples
    5: _ClassStyle((0.12, 0.17), "noise"),  # star: yellows
}


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    h = h % 1.0
    i = int(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i % 6]
    return np.array(rgb, dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray((grid * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _texture(rng: np.random.Generator, style: _ClassStyle, h: int, w: int) -> np.ndarray:
    """An (h, w, 3) float texture in [0, 1] in the class's colour family."""
    hue = rng.uniform(*style.hue)
    base = _hsv_to_rgb(hue, rng.uniform(0.65, 0.95), rng.uniform(0.7, 0.95))
    dark = _hsv_to_rgb(hue + rng.uniform(-0.02, 0.02), rng.uniform(0.7, 1.0), rng.uniform(0.25, 0.45))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if style.texture == "stripes":
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(5.0, 9.0)
        m = (np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period) > 0)
    elif style.texture == "checks":
        period = int(rng.integers(4, 8))
        m = ((xx // period + yy // period) % 2) == 0
    elif style.texture == "dots":
        period = rng.uniform(6.0, 9.0)
        r = period * 0.3
        m = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < r * r
    elif style.texture == "noise":
        m = _smooth_noise(rng, h, w, max(2, w // 6)) > 0.5
    else:  # solid with a gentle shading gradient
        m = np.zeros((h, w), dtype=bool)
    m = m.astype(np.float32)[..., None]
    tex = base * (1 - m) + dark * m
    if style.texture == "solid":
        shade = 0.85 + 0.3 * _smooth_noise(rng, h, w, 2)[..., None]
        tex = tex * shade
    tex = tex + rng.normal(0, 0.03, size=(h, w, 3)).astype(np.float32)
    return np.clip(tex, 0.0, 1.0)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Desaturated, low-contrast textured background (earth/grey tones), so objects stand out."""
    tone = _hsv_to_rgb(rng.uniform(0.05, 0.15), rng.uniform(0.0, 0.25), rng.uniform(0.35, 0.65))
    low = _smooth_noise(rng, h, w, int(rng.integers(2, 5)))[..., None]
    mid = _smooth_noise(rng, h, w, max(4, w // 12))[..., None]
    bg = tone * (0.75 + 0.35 * low + 0.15 * (mid - 0.5))
    bg = bg + rng.normal(0, 0.04, size=(h, w, 3)).astype(np.float32)
    return np.clip(bg, 0.0, 1.0)


def _shape_polygon(cls: int, cx: float, cy: float, r: float, rot: float, aspect: float) -> list[tuple[float, float]]:
    """Vertices of the shape of class ``cls`` centred at (cx, cy) with radius r."""
    if cls == 1:  # circle
        angles = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
    if cls == 2:  # square
        angles = rot + np.array([0.25, 0.75, 1.25, 1.75]) * math.pi
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
    if cls == 3:  # triangle
        angles = rot + np.array([0, 2, 4]) * math.pi / 3
        return [(cx + r * 1.15 * math.cos(a), cy + r * 1.15 * math.sin(a)) for a in angles]
    if cls == 4:  # ellipse: clearly elongated so it differs from a circle in shape too
        angles = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        pts = []
        for a in angles:
            x, y = r * math.cos(a), r * aspect * math.sin(a)
            pts.append((cx + x * math.cos(rot) - y * math.sin(rot), cy + x * math.sin(rot) + y * math.cos(rot)))
        return pts
    if cls == 5:  # five-pointed star
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = rot + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    raise ValueError(f"unknown toy class id {cls}")


def render_scene(rng: np.random.Generator, size: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Render one scene.

    Args:
        rng: the generator that decides everything about this scene.
        size: image side, or ``(width, height)``.

    Returns:
        ``image`` uint8 (H, W, 3), ``semantic`` uint8 (H, W) with class ids (0 = background),
        ``instance`` uint8 (H, W) with instance ids 1..n (0 = background), and ``objects``: one dict
        per visible instance with ``instance_id``, ``category_id``, ``mask`` (bool (H, W)),
        ``bbox`` (COCO ``[x, y, w, h]``) and ``area`` (visible pixels). Later objects occlude
        earlier ones; remnants under a dozen visible pixels are repainted with the background,
        so image, label maps and objects always agree.
    """
    w, h = (size, size) if isinstance(size, int) else size
    canvas = _background(rng, h, w)
    bg_copy = canvas.copy()
    instance = np.zeros((h, w), dtype=np.uint8)
    classes: list[int] = []
    n_obj = int(rng.integers(*_N_OBJECTS))
    side = min(h, w)
    for k in range(n_obj):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        r = rng.uniform(*_RADIUS) * side
        cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
        poly = _shape_polygon(cls, cx, cy, r, rng.uniform(0, 2 * math.pi), rng.uniform(0.4, 0.55))
        mimg = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mimg).polygon(poly, fill=255)
        mask = np.asarray(mimg) > 127
        tex = _texture(rng, _STYLES[cls], h, w)
        canvas[mask] = tex[mask]
        instance[mask] = k + 1
        classes.append(cls)
    # Drop (repaint with background) instances occluded down to a few pixels, renumber the rest
    # 1..n in drawing order, so the image, label maps and annotations always agree.
    objects: list[dict[str, Any]] = []
    new_instance = np.zeros_like(instance)
    semantic = np.zeros((h, w), dtype=np.uint8)
    for k, cls in enumerate(classes):
        mask = instance == k + 1
        if mask.sum() < _MIN_VISIBLE_PX:
            canvas[mask] = bg_copy[mask]
            continue
        iid = len(objects) + 1
        new_instance[mask] = iid
        semantic[mask] = cls
        ys, xs = np.nonzero(mask)
        x0, y0 = int(xs.min()), int(ys.min())
        objects.append({
            "instance_id": iid,
            "category_id": cls,
            "mask": mask,
            "bbox": [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)],
            "area": int(mask.sum()),
        })
    image = (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8)
    return image, semantic, new_instance, objects


def _meta(n_train: int, n_val: int, size: int | tuple[int, int], seed: int) -> dict[str, Any]:
    return {
        "version": TOY_VERSION,
        "classes": list(CLASS_NAMES),
        "num_classes": len(CLASS_NAMES),  # including background (id 0)
        "seed": int(seed),
        "size": list(size) if not isinstance(size, int) else int(size),
        "n_train": int(n_train),
        "n_val": int(n_val),
        "splits": list(_SPLITS),
    }


def load_meta(root: str | os.PathLike) -> dict[str, Any]:
    """Read ``root/meta.json`` (error naming the path if it is missing)."""
    path = Path(root) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a toy-scenes root (make it with make_toy_scenes)")
    return json.loads(path.read_text())


def stale_version_message(root: str | os.PathLike) -> str | None:
    """A message naming the fix if ``root`` holds scenes of another renderer version, else None."""
    try:
        version = load_meta(root).get("version")
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if version == TOY_VERSION:
        return None
    return (f"toy scenes at {root} were written by renderer version {version}, this code renders version "
            f"{TOY_VERSION} (published numbers use it): rebuild with tools/make_toy_scenes.py {root}")


def _render_split(tmp: Path, split: str, split_id: int, n: int, size: int | tuple[int, int], seed: int) -> None:
    from pycocotools import mask as mask_utils

    for sub in (split, f"semantic/{split}", f"instances/{split}", "annotations"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for idx in range(n):
        rng = np.random.default_rng([seed, split_id, idx])
        image, semantic, instance, objects = render_scene(rng, size)
        image_id = idx + 1
        stem = f"{image_id:012d}"
        Image.fromarray(image).save(tmp / split / f"{stem}.jpg", quality=92)
        Image.fromarray(semantic).save(tmp / "semantic" / split / f"{stem}.png")
        Image.fromarray(instance).save(tmp / "instances" / split / f"{stem}.png")
        hh, ww = semantic.shape
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": hh, "width": ww})
        for obj in objects:
            rle = mask_utils.encode(np.asfortranarray(obj["mask"].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": obj["category_id"],
                "segmentation": rle, "area": float(obj["area"]), "bbox": obj["bbox"], "iscrowd": 0,
            })
            ann_id += 1
    coco = {
        "info": {"description": "toy scenes", "version": str(TOY_VERSION)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n_, "supercategory": "shape"} for i, n_ in enumerate(CLASS_NAMES) if i > 0],
    }
    (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def _meta_matches(path: Path, want: dict[str, Any]) -> bool:
    try:
        return json.loads(path.read_text()) == want
    except (OSError, json.JSONDecodeError):  # missing, or corrupt (an unknown state: rebuild)
        return False


def make_toy_scenes(root: str | os.PathLike, n_train: int = 256, n_val: int = 64, size: int | tuple[int, int] = 128,
                    seed: int = 0) -> Path:
    """Write the toy-scenes dataset to ``root`` (layout in docs/contracts.md) and return ``root``.

    Idempotent: if ``root/meta.json`` already describes the same ``(n_train, n_val, size, seed)``
    and renderer version, nothing is written. Otherwise the dataset is rendered into a temporary
    folder inside ``root`` and moved into place, with ``meta.json`` written last, so an
    interrupted run never looks complete; concurrent callers serialise on a lock file.
    """
    root = Path(root)
    want = _meta(n_train, n_val, size, seed)
    meta_path = root / "meta.json"
    if _meta_matches(meta_path, want):
        return root
    root.mkdir(parents=True, exist_ok=True)
    # Concurrent callers (ranks, parallel tests) wait for one another here; the second one then
    # finds a matching meta.json and returns.
    with open(root / ".toy.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _meta_matches(meta_path, want):
            return root
        meta_path.unlink(missing_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".toy-tmp-", dir=root))
        try:
            for split_id, (split, n) in enumerate(zip(_SPLITS, (n_train, n_val))):
                _render_split(tmp, split, split_id, n, size, seed)
            for entry in ("train2017", "val2017", "annotations", "semantic", "instances"):
                dst = root / entry
                if dst.exists():
                    old = Path(tempfile.mkdtemp(prefix=".toy-old-", dir=root))
                    os.replace(dst, old / entry)
                    shutil.rmtree(old, ignore_errors=True)
                os.replace(tmp / entry, dst)
            tmp_meta = tmp / "meta.json"
            tmp_meta.write_text(json.dumps(want, indent=2))
            os.replace(tmp_meta, meta_path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root
