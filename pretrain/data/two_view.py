"""Two-view augmentation with crop boxes and flips (PIL/torchvision path).

One sample: decode (skipping undecodable files deterministically), draw a crop pair with the
overlap rule (pretrain/data/crops.py), resize each crop bicubically to ``S x S``, flip, apply the
BYOL photometric augmentations (pretrain/data/photometric.py), normalise, and compute the
intersection box in each view's own, post-flip, normalised coordinates (docs/contracts.md).
All randomness comes from ``(seed, epoch, index)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .config import DataConfig
from .crops import N_PAIR, intersection_boxes, sample_crop_pair, sample_key
from .datasets import load_valid
from .photometric import apply_photometric, normalize, sample_photometric

RATIO = (3.0 / 4.0, 4.0 / 3.0)


def photometric_kwargs(cfg: DataConfig, view: int) -> dict[str, Any]:
    """The photometric settings of ``view`` (0 or 1) from the config."""
    return dict(color_jitter=cfg.color_jitter, color_jitter_p=cfg.color_jitter_p,
                grayscale_p=cfg.grayscale_p, blur_p=cfg.blur_p[view], solarize_p=cfg.solarize_p[view])


def draw_pair(cfg: DataConfig, seed: int, epoch: int, index: int, height: int, width: int) -> np.ndarray:
    """The crop pair ``[i1, j1, h1, w1, flip1, i2, j2, h2, w2, flip2]`` of one sample."""
    out = np.zeros(N_PAIR, dtype=np.int64)
    sample_crop_pair(sample_key(seed, epoch, index, 0), height, width, cfg.min_scale, cfg.max_scale,
                     RATIO[0], RATIO[1], cfg.min_overlap, cfg.flip_p, out)
    return out


def crop_resize(img: Image.Image, i: int, j: int, h: int, w: int, size: int, flip: bool) -> torch.Tensor:
    """Bicubic resized crop of rows ``[i, i+h)`` and columns ``[j, j+w)`` to ``size``, then flip;
    uint8 ``(3, size, size)``."""
    out = img.resize((size, size), Image.BICUBIC, box=(j, i, j + w, i + h))
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1)


def finish_views(raw: torch.Tensor, cfg: DataConfig, seed: int, epoch: int, indices: list[int], view: int) -> torch.Tensor:
    """uint8 ``(B,3,S,S)`` crops -> augmented, normalised float32 views (both loader paths)."""
    params = sample_photometric(seed, epoch, indices, view, **photometric_kwargs(cfg, view))
    x = raw.float().div_(255.0)
    return normalize(apply_photometric(x, params)).float()


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
        v1 = crop_resize(img, *pair[0:4].tolist(), s, bool(pair[4]))
        v2 = crop_resize(img, *pair[5:9].tolist(), s, bool(pair[9]))
        b1, b2 = intersection_boxes(pair)
        return {
            "view1": finish_views(v1[None], self.cfg, self.seed, epoch, [index], 0)[0],
            "view2": finish_views(v2[None], self.cfg, self.seed, epoch, [index], 1)[0],
            "box1": torch.from_numpy(b1), "box2": torch.from_numpy(b2),
            "flip1": torch.tensor(bool(pair[4])), "flip2": torch.tensor(bool(pair[9])),
            "skipped": torch.tensor(skipped, dtype=torch.int64),
            "index": torch.tensor(used, dtype=torch.int64),
        }
