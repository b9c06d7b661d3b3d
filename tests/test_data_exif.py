"""EXIF orientation: pretraining decodes the same upright pixels as Detectron2's reader, and the
PIL path's crop boxes are drawn on the upright size (the FFCV path is checked in
tests/test_data_faults.py, on a .beton that stores the rotated photos upright)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import transfer.detection.compat  # noqa: F401  (before Detectron2)
from detectron2.data.detection_utils import read_image

from pretrain.data import build_pretrain_loader
from pretrain.data.datasets import decode_rgb
from pretrain.data.two_view import draw_pair
from tests.data_helpers import check_views_against_source, geometric_cfg
from tests.test_data_faults import _coord_exif

CPU = torch.device("cpu")


def _corner_jpeg(path: Path, orientation: int, h: int = 48, w: int = 80) -> Path:
    """A grey JPEG with a red top-left corner in its stored pixels, tagged with ``orientation``."""
    arr = np.full((h, w, 3), 128, np.uint8)
    arr[:12, :16] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, quality=95, exif=exif)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decode_matches_detectron2_reader(tmp_path, orientation):
    p = _corner_jpeg(tmp_path / f"o{orientation}.jpg", orientation)
    got = decode_rgb(p)
    np.testing.assert_array_equal(got, read_image(str(p), format="RGB"))
    assert got.shape == ((80, 48, 3) if orientation >= 5 else (48, 80, 3))  # 5-8 swap the sides


def test_orientation_6_puts_the_corner_top_right(tmp_path):
    """Orientation 6: the camera was turned 90 degrees clockwise; upright, the stored top-left
    corner sits at the top right."""
    got = decode_rgb(_corner_jpeg(tmp_path / "o6.jpg", 6))
    assert got.shape == (80, 48, 3)
    red = (got[..., 0] > 200) & (got[..., 1] < 60)
    rows, cols = np.nonzero(red)
    assert rows.max() < 16 and cols.min() >= 48 - 12 - 1  # a 16 x 12 block at the top right
    assert abs(int(red.sum()) - 16 * 12) < 20


def test_pil_loader_crops_the_upright_photo(tmp_path):
    root = tmp_path / "imgs"
    _coord_exif(root / "a.jpg", 200, 256, 6)
    _coord_exif(root / "b.jpg", 200, 256, 8)
    _coord_exif(root / "c.jpg", 200, 256, 3)
    cfg = geometric_cfg(root, min_scale=0.08)
    loader = build_pretrain_loader(cfg, 3, rank=0, world_size=1, seed=4, device=CPU)
    for epoch in range(4):
        loader.set_epoch(epoch)
        for batch in loader:
            # drawn on the upright 200 x 256: views show the pixels their boxes say
            pairs = np.stack([draw_pair(cfg, 4, epoch, i, 200, 256) for i in batch["index"].tolist()])
            check_views_against_source(batch, pairs, tol=3.0)  # JPEG error on top of resampling
