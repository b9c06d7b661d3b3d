"""Image lists from the standard dataset layouts, and robust decoding to RGB.

Layouts (``root`` is ``DataConfig.root``):

- ``coco``: ``root/train2017/*.jpg``
- ``cocoplus``: ``root/train2017/*`` + ``root/unlabeled2017/*`` (COCO+ of SlotCon Table 1)
- ``imagenet``: ``root/train/<class>/*``
- ``folder``: every image below ``root`` (recursive)
- ``toy``: the toy scenes' ``root/train2017/*`` (pretrain/data/toy_scenes.py)

Only files with an image extension are listed. Decoding handles greyscale, palette, CMYK, RGBA
(alpha dropped) and 16-bit images; files that cannot be decoded (truncated, corrupt) raise
:class:`BadImageError`, and the caller substitutes the next valid index and counts the skip.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif"})

_LAYOUTS = {
    "coco": ("train2017",),
    "cocoplus": ("train2017", "unlabeled2017"),
    "imagenet": ("train",),
    "folder": (".",),
    "toy": ("train2017",),
}
_EXPECTED = {
    "coco": "root/train2017/*.jpg",
    "cocoplus": "root/train2017/*.jpg and root/unlabeled2017/*.jpg",
    "imagenet": "root/train/<class>/*.JPEG",
    "folder": "image files anywhere below root",
    "toy": "root/train2017/*.jpg (make it with tools/make_toy_scenes.py)",
}


class BadImageError(RuntimeError):
    """An image file that exists but cannot be decoded."""


def list_images(folder: str | os.PathLike) -> list[Path]:
    """All image files below ``folder`` (by extension), sorted for a stable index order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in sorted(filenames):
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                out.append(Path(dirpath) / f)
    return out


def dataset_files(kind: str, root: str | os.PathLike) -> list[Path]:
    """The image files of dataset ``kind`` under ``root``; a missing or empty folder is an error
    that names the path and the expected layout."""
    if kind not in _LAYOUTS:
        raise ValueError(f"data.dataset={kind!r} is not one of {sorted(_LAYOUTS)}")
    root = Path(root)
    files: list[Path] = []
    for sub in _LAYOUTS[kind]:
        folder = (root / sub) if sub != "." else root
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a directory: data.dataset={kind} expects {_EXPECTED[kind]}")
        found = list_images(folder)
        if not found:
            raise FileNotFoundError(f"{folder} holds no image files: data.dataset={kind} expects {_EXPECTED[kind]}")
        files.extend(found)
    return files


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit integer) greyscale: PIL's convert("RGB") would clip at 255.
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        g = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "F":
        a = np.asarray(im).astype(np.float64)
        a = a * 255.0 if a.max() <= 1.0 else a
        g = np.clip(a + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode in ("P", "PA"):
        im = im.convert("RGBA")
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, LA, RGBA (alpha dropped), CMYK, YCbCr, 1
    return np.asarray(im, dtype=np.uint8)


def decode_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode ``path`` to an ``(H, W, 3)`` uint8 RGB array; :class:`BadImageError` if undecodable."""
    try:
        with Image.open(path) as im:
            im.load()  # truncated files raise here (LOAD_TRUNCATED_IMAGES stays off)
            arr = _to_rgb(im)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise BadImageError(f"cannot decode {path}: {e}") from e
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise BadImageError(f"cannot decode {path}: empty image of shape {arr.shape}")
    return np.ascontiguousarray(arr)


def load_valid(files: list[Path], index: int) -> tuple[np.ndarray, int, int]:
    """Decode ``files[index]``, substituting the next decodable index (cyclically) if it fails.

    Returns ``(image, used_index, skipped)``; deterministic in ``index``. Raises if no file at all
    can be decoded.
    """
    n = len(files)
    for skipped in range(n):
        k = (index + skipped) % n
        try:
            return decode_rgb(files[k]), k, skipped
        except BadImageError:
            continue
    raise BadImageError(f"none of the {n} files (e.g. {files[0]}) can be decoded")
