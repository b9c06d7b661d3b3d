"""Bad and unusual inputs: each decodes to the right RGB or is skipped, counted and bounded."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.data import build_pretrain_loader
from pretrain.data.datasets import BadImageError, dataset_files, decode_rgb, list_images
from tests.data_helpers import geometric_cfg

CPU = torch.device("cpu")


def _jpeg_bytes(arr: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _photo(h: int = 40, w: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 4, yy * 5, (xx + yy) * 2], -1)
    return np.clip(base + rng.normal(0, 3, (h, w, 3)), 0, 255).astype(np.uint8)


def test_unusual_modes_decode_to_rgb(tmp_path):
    photo = _photo()
    gray = (np.arange(40 * 48).reshape(40, 48) % 251).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(decode_rgb(tmp_path / "gray.png"), np.repeat(gray[..., None], 3, 2))

    rgba = np.concatenate([photo, np.full((40, 48, 1), 10, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(decode_rgb(tmp_path / "rgba.png"), photo)  # alpha dropped

    g16 = (np.arange(40 * 48).reshape(40, 48) * 30).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    got = decode_rgb(tmp_path / "g16.png")
    np.testing.assert_allclose(got[..., 0], g16 / 65535 * 255, atol=0.51)  # scaled, not clipped at 255
    assert got[..., 0].max() > 100

    (tmp_path / "cmyk.jpg").write_bytes(_jpeg_bytes(photo, "CMYK"))
    got = decode_rgb(tmp_path / "cmyk.jpg")
    assert got.shape == (40, 48, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - photo).mean() < 8  # same picture after the CMYK round trip

    pal = Image.fromarray(photo).convert("P", palette=Image.ADAPTIVE, colors=32)
    pal.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(decode_rgb(tmp_path / "pal.png"), np.asarray(pal.convert("RGB")))

    Image.fromarray(photo[:3, :2]).save(tmp_path / "tiny.png")
    assert decode_rgb(tmp_path / "tiny.png").shape == (3, 2, 3)


def test_undecodable_files_raise(tmp_path):
    good = _jpeg_bytes(_photo())
    (tmp_path / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"\x00garbage" * 50)
    (tmp_path / "empty.png").write_bytes(b"")
    for name in ("trunc.jpg", "junk.jpg", "empty.png"):
        with pytest.raises(BadImageError, match=name):
            decode_rgb(tmp_path / name)


def _make_folder(tmp_path):
    """Eight files in sorted order, three of them bad, plus non-image files."""
    root = tmp_path / "imgs"
    root.mkdir()
    good = _jpeg_bytes(_photo())
    names = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg", "g.png", "h.jpg"]
    bad = {"b.jpg": good[:300], "c.jpg": b"not a jpeg", "f.jpg": good[: len(good) // 3]}
    for n in names:
        if n in bad:
            (root / n).write_bytes(bad[n])
        elif n.endswith(".png"):
            Image.fromarray(_photo(seed=3)).convert("L").save(root / n)
        else:
            (root / n).write_bytes(good)
    (root / "README.txt").write_text("hello")
    (root / "labels.csv").write_text("a,1")
    (root / "noext").write_bytes(good)
    return root, names, bad


def test_listing_excludes_non_images(tmp_path):
    root, names, _ = _make_folder(tmp_path)
    assert [p.name for p in list_images(root)] == names
    assert len(dataset_files("folder", root)) == 8


def test_loader_skips_counts_and_bounds_bad_images(tmp_path):
    root, names, bad = _make_folder(tmp_path)
    cfg = geometric_cfg(root, image_size=16, max_bad_fraction=0.5)
    loader = build_pretrain_loader(cfg, 4, rank=0, world_size=1, seed=0, device=CPU, drop_last=False)
    batches = list(loader)
    index = torch.cat([b["index"] for b in batches])
    skipped = torch.cat([b["skipped"] for b in batches])
    bad_ix = {names.index(n) for n in bad}
    assert not set(index.tolist()) & bad_ix  # bad files never reach a batch
    # requested b -> c fails too -> d (skip 2); c -> d (1); f -> g (1): 4 failures per epoch
    assert int(skipped.sum()) == 4 == loader.bad_images
    by_source = dict(zip(index.tolist(), skipped.tolist()))
    assert by_source[names.index("g.png")] in (0, 1)
    for b in batches:
        assert torch.isfinite(b["view1"]).all() and b["view1"].shape == (len(b["index"]), 3, 16, 16)
    assert sorted(loader.tracker.bad_files) == sorted(bad_ix)

    strict = build_pretrain_loader(geometric_cfg(root, image_size=16, max_bad_fraction=0.2), 4, rank=0,
                                   world_size=1, seed=0, device=CPU, drop_last=False)
    with pytest.raises(RuntimeError, match=r"max_bad_fraction=0.2.*imgs/[bcf]\.jpg"):
        list(strict)


def test_all_bad_is_an_error(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for k in range(3):
        (root / f"{k}.jpg").write_bytes(b"junk")
    loader = build_pretrain_loader(geometric_cfg(root, image_size=8, max_bad_fraction=1.0), 2, rank=0,
                                   world_size=1, seed=0, device=CPU)
    with pytest.raises(BadImageError, match="none of the 3 files"):
        list(loader)
