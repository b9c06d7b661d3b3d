"""Two-view augmentation with crop boxes and flips (PIL/torchvision path).

One sample: decode (skipping undecodable files deterministically), draw a crop pair with the
overlap rule (pretrain/data/crops.py), resize each crop bicubically to ``S x S``, flip, apply the
BYOL photometric augmentations (OpenCV per image, pretrain/data/photometric_cpu.py), normalise,
and compute the intersection box in each view's own, post-flip, normalised coordinates
(docs/contracts.md).
All randomness comes from ``(seed, epoch, index)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .config import DataConfig
from .crops import HFLIP, N_PAIR, VFLIP, intersection_boxes, sample_crop_pair, sample_key
from .datasets import load_valid
from .photometric import apply_photometric, normalize, sample_photometric
from .photometric_cpu import augment_image, params_numpy

RATIO = (3.0 / 4.0, 4.0 / 3.0)


def photometric_kwargs(cfg: DataConfig, view: int) -> dict[str, Any]:
    """The photometric settings of ``view`` (0 or 1) from the config."""
    return dict(color_jitter=cfg.color_jitter, color_jitter_p=cfg.color_jitter_p,
                grayscale_p=cfg.grayscale_p, blur_p=cfg.blur_p[view], solarize_p=cfg.solarize_p[view])


def draw_pair(cfg: DataConfig, seed: int, epoch: int, index: int, height: int, width: int) -> np.ndarray:
    """The crop pair ``[i1, j1, h1, w1, flip1, i2, j2, h2, w2, flip2]`` of one sample."""
    out = np.zeros(N_PAIR, dtype=np.int64)
    sample_crop_pair(sample_key(seed, epoch, index, 0), height, width, cfg.min_scale, cfg.max_scale,
                     RATIO[0], RATIO[1], cfg.min_overlap, cfg.flip_p, cfg.vflip_p, out)
    return out


def crop_resize(img: Image.Image, i: int, j: int, h: int, w: int, size: int, flip: int) -> np.ndarray:
    """Bicubic resized crop of rows ``[i, i+h)`` and columns ``[j, j+w)`` to ``size``, then the flips
    of ``flip`` (a code: bit 0 horizontal, bit 1 vertical); uint8 ``(size, size, 3)``."""
    out = img.resize((size, size), Image.BICUBIC, box=(j, i, j + w, i + h))
    if flip & HFLIP:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    if flip & VFLIP:
        out = out.transpose(Image.FLIP_TOP_BOTTOM)
    return np.asarray(out, dtype=np.uint8)


def flip_image(img: np.ndarray, flip: int) -> np.ndarray:
    """An ``(H, W, C)`` image with the flips of code ``flip`` applied (OpenCV; the input if none)."""
    code = int(flip) & (HFLIP | VFLIP)
    if code == 0:
        return img
    return cv2.flip(img, {HFLIP: 1, VFLIP: 0, HFLIP | VFLIP: -1}[code])


def finish_views(raw: torch.Tensor, cfg: DataConfig, seed: int, epoch: int, indices: list[int], view: int) -> torch.Tensor:
    """uint8 ``(B,3,S,S)`` crops -> augmented, normalised float32 views, batched with torch on the
    crops' device (the FFCV path on a GPU)."""
    params = sample_photometric(seed, epoch, indices, view, **photometric_kwargs(cfg, view))
    x = raw.float().div_(255.0)
    return normalize(apply_photometric(x, params)).float()


def finish_views_cpu(crops: np.ndarray, flips: np.ndarray, cfg: DataConfig, seed: int, epoch: int,
                     indices: list[int], view: int, out: np.ndarray) -> None:
    """uint8 ``(B,S,S,3)`` crops -> flipped (``flips``: codes, see crops.py), augmented, normalised
    float32 views written into ``out`` ``(B,3,S,S)``, one image at a time with OpenCV (both loader
    paths on the CPU)."""
    p = params_numpy(sample_photometric(seed, epoch, indices, view, **photometric_kwargs(cfg, view)))
    for i in range(len(indices)):
        augment_image(flip_image(crops[i], flips[i]), p, i, out=out[i])


class TwoViewDataset(Dataset):
    """Map-style dataset of two-view samples; items are requested as ``(epoch, index)`` so that
    persistent workers need no epoch state and any batch can be rebuilt on its own."""

    def __init__(self, files: list[Path], cfg: DataConfig, seed: int):
        self.files = files
        self.cfg = cfg
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        if torch.utils.data.get_worker_info() is not None:
            return self._sample(*key)
        # In the main process (num_workers=0): one sample's tensors are tiny, and intra-op threads
        # only add synchronisation (badly so on a busy machine), so run them single-threaded.
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._sample(*key)
        finally:
            torch.set_num_threads(prev)

    def _sample(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        arr, used, skipped = load_valid(self.files, index)
        img = Image.fromarray(arr)
        pair = draw_pair(self.cfg, self.seed, epoch, index, arr.shape[0], arr.shape[1])
        s = self.cfg.image_size
        views = []
        for v in (0, 1):
            crop = crop_resize(img, *pair[5 * v:5 * v + 4].tolist(), s, int(pair[5 * v + 4]))
            out = torch.empty((1, 3, s, s))
            finish_views_cpu(crop[None], np.zeros(1, np.int64), self.cfg, self.seed, epoch, [index], v, out.numpy())
            views.append(out[0])
        b1, b2 = intersection_boxes(pair)
        return {
            "view1": views[0], "view2": views[1],
            "box1": torch.from_numpy(b1), "box2": torch.from_numpy(b2),
            "flip1": torch.tensor(int(pair[4]), dtype=torch.uint8),
            "flip2": torch.tensor(int(pair[9]), dtype=torch.uint8),
            "skipped": torch.tensor(skipped, dtype=torch.int64),
            "index": torch.tensor(used, dtype=torch.int64),
        }
