"""Image lists from the standard dataset layouts, and robust decoding to RGB.

Layouts (``root`` is ``DataConfig.root``):

- ``coco``: ``root/train2017/*.jpg``
- ``cocoplus``: ``root/train2017/*`` + ``root/unlabeled2017/*`` (COCO+ of SlotCon Table 1)
- ``imagenet``: ``root/train/<class>/*``
- ``folder``: every image below ``root`` (recursive)
- ``toy``: the toy scenes' ``root/train2017/*`` (pretrain/data/toy_scenes.py)

Only files with an image extension are listed. Decoding applies the EXIF orientation (as
Detectron2's ``read_image`` does, so pretraining sees the same upright pixels as the transfer
tasks) and handles greyscale, palette, CMYK, RGBA (alpha dropped) and 16-bit images. Files that
cannot be decoded (truncated, corrupt, or decompression bombs: more pixels than PIL's
``Image.MAX_IMAGE_PIXELS``) raise :class:`BadImageError`, and the caller substitutes the next
valid index and counts the skip.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

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


def _upright(im: Image.Image) -> None:
    """Apply ``im``'s EXIF orientation to its pixels, in place."""
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except Exception:  # noqa: BLE001 - a broken EXIF block leaves the pixels usable as stored (as Detectron2's reader)
        pass


def decode_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode ``path`` to an upright (EXIF orientation applied) ``(H, W, 3)`` uint8 RGB array.

    Raises :class:`BadImageError` if the file cannot be decoded, including decompression bombs:
    images with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (PIL only warns up to twice that).
    """
    try:
        with warnings.catch_warnings():
            # Past the limit PIL would decode a possibly gigantic image after a warning; skip it instead.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # truncated files raise here (LOAD_TRUNCATED_IMAGES stays off)
                _upright(im)
                arr = _to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"cannot decode {path}: decompression bomb ({e})") from e
    except Exception as e:  # noqa: BLE001 - PIL's plugins raise many types on malformed files; each means "bad file"
        raise BadImageError(f"cannot decode {path}: {type(e).__name__}: {e}") from e
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise BadImageError(f"cannot decode {path}: empty image of shape {arr.shape}")
    return np.ascontiguousarray(arr)


def load_valid(files: list[Path], index: int,
               prepare: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, int, int]:
    """Decode ``files[index]``, substituting the next good index (cyclically) if it fails.

    ``prepare`` (e.g. the FFCV writer's resize and storability checks) runs on each decoded image
    and may reject it with :class:`BadImageError`, like a decode failure. Returns
    ``(image, used_index, skipped)``; deterministic in ``index``. Raises if no file at all is good.
    """
    n = len(files)
    for skipped in range(n):
        k = (index + skipped) % n
        try:
            img = decode_rgb(files[k])
            return (prepare(img) if prepare is not None else img), k, skipped
        except BadImageError:
            continue
    raise BadImageError(f"none of the {n} files (e.g. {files[0]}) can be decoded")
