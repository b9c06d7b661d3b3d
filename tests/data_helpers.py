"""Shared helpers of the data tests: coordinate-encoding images and box checks."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.ops import roi_align

from pretrain.data.config import DataConfig
from pretrain.data.photometric import IMAGENET_MEAN, IMAGENET_STD


def coord_image(path: Path, size: int = 256) -> Path:
    """A lossless image whose red channel is the column and green channel the row."""
    yy, xx = np.mgrid[0:size, 0:size]
    arr = np.stack([xx, yy, np.full_like(xx, 77)], -1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def geometric_cfg(root: Path, **kw) -> DataConfig:
    """A config with every photometric augmentation off, so pixels keep their coordinates."""
    base = dict(dataset="folder", root=str(root), image_size=32, color_jitter_p=0.0, grayscale_p=0.0,
                blur_p=[0.0, 0.0], solarize_p=[0.0, 0.0], num_workers=0)
    base.update(kw)
    return DataConfig(**base)


def decode_coords(view: torch.Tensor) -> torch.Tensor:
    """Normalised view ``(B,3,S,S)`` -> continuous source coordinates ``(B,2,S,S)`` (x, y) of
    each pixel (pixel k of the source has its centre at k + 0.5)."""
    mean = view.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = view.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = (view * std + mean) * 255.0
    return rgb[:, :2] + 0.5


def aligned(coords: torch.Tensor, box: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Inverse augmentation of docs/contracts.md: roi_align over the box, then un-flip."""
    b, _, h, w = coords.shape
    scaled = box * box.new_tensor([w, h, w, h])
    rois = torch.cat([torch.arange(b, dtype=box.dtype)[:, None], scaled], 1)
    out = roi_align(coords, rois, output_size=(h, w), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    code = flip.to(torch.int64).view(-1, 1, 1, 1)  # bit 0 horizontal, bit 1 vertical
    out = torch.where((code & 1) > 0, out.flip(-1), out)
    return torch.where((code & 2) > 0, out.flip(-2), out)


def check_views_against_source(batch: dict, pairs: np.ndarray | None = None, tol: float = 1.5) -> None:
    """Every pixel of each view shows the source location its crop and flip say, and the
    aligned views agree with each other and with the source's intersection box."""
    for v in (1, 2):
        c = decode_coords(batch[f"view{v}"])
        s = c.shape[-1]
        if pairs is not None:
            i, j, h, w, f = (torch.as_tensor(pairs[:, 5 * (v - 1) + k], dtype=torch.float32) for k in range(5))
            u = (torch.arange(s, dtype=torch.float32) + 0.5) / s
            exp_x = j[:, None] + u[None] * w[:, None]  # (B, S) along columns
            code = f.to(torch.int64)[:, None]
            exp_x = torch.where((code & 1) > 0, exp_x.flip(-1), exp_x)
            exp_y = i[:, None] + u[None] * h[:, None]
            exp_y = torch.where((code & 2) > 0, exp_y.flip(-1), exp_y)
            inner = slice(2, s - 2)
            dx = (c[:, 0, inner, inner] - exp_x[:, None, inner]).abs()
            dy = (c[:, 1, inner, inner] - exp_y[:, inner, None]).abs()
            # a pixel of the view spans w/S source pixels: allow interpolation error of that order
            scale = torch.maximum(w, h)[:, None, None] / s
            assert (dx <= tol + scale).all() and (dy <= tol + scale).all(), (dx.max(), dy.max())
        # flips: x increases left to right unless the view was flipped horizontally (bit 0), y top
        # to bottom unless it was flipped vertically (bit 1)
        code = batch[f"flip{v}"].to(torch.int64)
        for axis, bit, slope in ((0, 1, c[:, 0, :, -4].mean(-1) - c[:, 0, :, 3].mean(-1)),
                                 (1, 2, c[:, 1, -4, :].mean(-1) - c[:, 1, 3, :].mean(-1))):
            big = slope.abs() > 2
            assert ((slope[big] < 0) == ((code[big] & bit) > 0)).all(), f"axis {axis}"
    a1 = aligned(decode_coords(batch["view1"]), batch["box1"], batch["flip1"])
    a2 = aligned(decode_coords(batch["view2"]), batch["box2"], batch["flip2"])
    inner = slice(2, -2)
    diff = (a1 - a2)[..., inner, inner].abs()
    assert diff.median() < tol, diff.median()
    assert torch.quantile(diff.flatten(), 0.95) < 4 * tol
    if pairs is not None:
        # aligned pixel (r, c) of both views is source location (x1 + (c + .5) dx, y1 + (r + .5) dy)
        p = torch.as_tensor(pairs, dtype=torch.float32)
        x1 = torch.maximum(p[:, 1], p[:, 6])
        x2 = torch.minimum(p[:, 1] + p[:, 3], p[:, 6] + p[:, 8])
        y1 = torch.maximum(p[:, 0], p[:, 5])
        y2 = torch.minimum(p[:, 0] + p[:, 2], p[:, 5] + p[:, 7])
        s = a1.shape[-1]
        u = (torch.arange(s, dtype=torch.float32) + 0.5) / s
        sx = x1[:, None] + u[None] * (x2 - x1)[:, None]
        sy = y1[:, None] + u[None] * (y2 - y1)[:, None]
        for a in (a1, a2):
            ex = (a[:, 0] - sx[:, None, :]).abs()[..., inner, inner]
            ey = (a[:, 1] - sy[:, :, None]).abs()[..., inner, inner]
            assert ex.median() < tol and ey.median() < tol, (ex.median(), ey.median())


def run_visualize_slots(checkpoint: Path, images: list[Path], out: Path, monkeypatch) -> list[str]:
    """``tools/visualize_slots.py CHECKPOINT IMAGES --out OUT`` as a user runs it, in this process (spares
    an interpreter start); returns the names of the pictures it wrote."""
    script = Path(__file__).resolve().parents[1] / "tools" / "visualize_slots.py"
    argv = [str(script), str(checkpoint), *map(str, images), "--out", str(out), "--device", "cpu", "--size", "64"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(argv[0], run_name="__main__")
    return sorted(p.name for p in out.glob("*.png"))
