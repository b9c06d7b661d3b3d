"""Bad images never hang or crash: decompression bombs, extreme aspect ratios, corrupt files and
a bad last sample are skipped and counted on the PIL path, by the FFCV writer (and
tools/make_ffcv.py) and on the FFCV path; a writer worker that dies or stalls ends the write."""
from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.data import build_pretrain_loader
from pretrain.data import ffcv_writer
from pretrain.data.datasets import BadImageError, dataset_files, decode_rgb
from pretrain.data.ffcv_writer import WriterError, write_beton
from pretrain.data.two_view import draw_pair
from tests.data_helpers import check_views_against_source, coord_image, geometric_cfg

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A 1-bit PNG whose header claims ``side``^2 pixels (over twice PIL's MAX_IMAGE_PIXELS at
    20000): a decompression bomb. Its payload holds only the first rows: PIL judges the header
    before it reads any pixel data, and a full payload would only cost time to compress."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    idat = zlib.compress(row * 16)
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def photo(path: Path, h: int = 40, w: int = 48, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def corrupt(path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(buf, "JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue()[:200])
    return path


def test_bomb_png_is_cheap_and_claims_its_size(tmp_path):
    p = bomb_png(tmp_path / "b.png")
    assert p.stat().st_size < 2_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(p) as im:
                assert im.size == (20000, 20000)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def test_decode_rejects_decompression_bombs(tmp_path, monkeypatch):
    bomb = bomb_png(tmp_path / "bomb.png")  # over 2x the limit: PIL raises DecompressionBombError
    with pytest.raises(BadImageError, match="bomb.png.*decompression bomb"):
        decode_rgb(bomb)
    small = photo(tmp_path / "small.png")  # 1920 pixels
    filters = list(warnings.filters)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1x-2x the limit: PIL only warns
    with pytest.raises(BadImageError, match="small.png.*decompression bomb"):
        decode_rgb(small)
    assert warnings.filters == filters  # the warning became an error only inside decode_rgb
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    assert decode_rgb(small).shape == (40, 48, 3)


def test_pil_loader_skips_and_counts_a_bomb(tmp_path):
    root = tmp_path / "imgs"
    for k in (0, 1, 3, 4, 5):
        photo(root / f"{k}.png", seed=k)
    bomb_png(root / "2.png")
    photo(root / "6.png", h=1, w=4000)  # an extreme aspect ratio decodes and crops (1x1 crops)
    bomb_png(root / "7.png")  # the last sample: its replacement is index 0
    cfg = geometric_cfg(root, image_size=16, max_bad_fraction=0.3)
    loader = build_pretrain_loader(cfg, 4, rank=0, world_size=1, seed=0, device=CPU, drop_last=False)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = list(loader)
        index = torch.cat([b["index"] for b in batches]).tolist()
        skipped = torch.cat([b["skipped"] for b in batches]).tolist()
        assert sorted(index) == sorted([0, 1, 3, 3, 4, 5, 6, 0])  # 2 -> 3, 7 -> 0 (cyclic)
        assert sum(skipped) == 2
        for b in batches:
            assert torch.isfinite(b["view1"]).all() and torch.isfinite(b["view2"]).all()
    assert loader.bad_images == 4 and sorted(loader.tracker.bad_files) == [2, 7]
    strict = build_pretrain_loader(geometric_cfg(root, image_size=16, max_bad_fraction=0.2), 4, rank=0,
                                   world_size=1, seed=0, device=CPU, drop_last=False)
    with pytest.raises(RuntimeError, match=r"max_bad_fraction=0.2.*imgs/[27]\.png"):
        list(strict)


def _bad_folder(root: Path) -> list[str]:
    """Good images first and last, between them every kind of image that FFCV cannot store."""
    photo(root / "a.jpg", seed=1)
    photo(root / "b_wide.png", h=1, w=4000)
    photo(root / "c_tall.png", h=4000, w=1)
    bomb_png(root / "d_bomb.png")
    corrupt(root / "e_corrupt.jpg")
    photo(root / "f.jpg", h=600, w=400, seed=2)
    return ["a.jpg", "b_wide.png", "c_tall.png", "d_bomb.png", "e_corrupt.jpg", "f.jpg"]


def test_writer_skips_images_it_cannot_store(tmp_path):
    from ffcv.reader import Reader

    names = _bad_folder(tmp_path / "imgs")
    files = dataset_files("folder", tmp_path / "imgs")
    assert [f.name for f in files] == names
    out = tmp_path / "d.beton"
    stats = write_beton(files, out, max_resolution=512, num_workers=2, max_bad_fraction=0.9)
    assert stats["images"] == 6 and stats["bad"] == 4
    assert [Path(p).name for p in stats["bad_files"]] == names[1:5]
    why = dict(e.split(": ", 1) for e in stats["examples"])
    assert "aspect ratio" in why[str(files[1])] and "aspect ratio" in why[str(files[2])]
    assert "decompression bomb" in why[str(files[3])]
    assert why[str(files[4])]  # a PIL error message
    meta = Reader(str(out)).metadata
    assert meta["f1"].tolist() == [0, 5, 5, 5, 5, 5]
    assert meta["f2"].tolist() == [0, 4, 3, 2, 1, 0]
    assert meta["f0"]["height"].tolist() == [40] + [512] * 5  # f.jpg: 600x400 -> 512x341
    assert meta["f0"]["width"].tolist() == [48] + [341] * 5


def test_writer_skips_raw_images_larger_than_a_page(tmp_path):
    from ffcv.reader import Reader

    root = tmp_path / "imgs"
    photo(root / "a.png")
    Image.fromarray(np.zeros((1500, 2000, 3), np.uint8)).save(root / "b.png")  # 9 MB > 8 MiB page
    stats = write_beton(dataset_files("folder", root), tmp_path / "r.beton", max_resolution=None,
                        write_mode="raw", num_workers=1, max_bad_fraction=0.9)
    assert stats["bad"] == 1 and "FFCV page" in stats["examples"][0]
    assert Reader(str(tmp_path / "r.beton")).metadata["f1"].tolist() == [0, 0]


def _die(how: str):
    original = ffcv_writer._Source.__getitem__

    def getitem(self, k):
        if k == 2:
            if how == "exit":
                os._exit(3)
            if how == "kill":
                os.kill(os.getpid(), 9)
            time.sleep(120)  # "stall"
        return original(self, k)

    return getitem


@pytest.mark.parametrize("how, message", [("exit", "exited with code 3"), ("kill", "killed by signal 9"),
                                          ("stall", "no progress of the FFCV writer for 3s")])
def test_writer_watchdog_ends_a_dead_or_stuck_write(tmp_path, monkeypatch, how, message):
    root = tmp_path / "imgs"
    for k in range(8):
        photo(root / f"{k}.png", seed=k)
    monkeypatch.setattr(ffcv_writer._Source, "__getitem__", _die(how))  # the forked workers inherit it
    out = tmp_path / "w.beton"
    # a short stall limit only where the stall is the point: on a busy machine it could pre-empt the others
    with pytest.raises(WriterError, match=message):
        write_beton(dataset_files("folder", root), out, num_workers=2, stall_timeout=3 if how == "stall" else 600,
                    chunksize=2)
    assert not out.exists() and not list(tmp_path.glob(".w.beton.tmp-*"))


def test_make_ffcv_exits_nonzero_when_a_worker_dies(tmp_path, monkeypatch, capsys):
    from tools import make_ffcv

    root = tmp_path / "imgs"
    for k in range(4):
        photo(root / f"{k}.png", seed=k)
    monkeypatch.setattr(ffcv_writer._Source, "__getitem__", _die("exit"))
    with pytest.raises(SystemExit) as e:
        make_ffcv.main([str(tmp_path / "x.beton"), "--dataset", "folder", "--root", str(root), "--workers", "1"])
    assert "not written" in str(e.value.code) and "exited with code 3" in str(e.value.code)
    assert not (tmp_path / "x.beton").exists()


def _tool(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "tools" / "make_ffcv.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_make_ffcv_finishes_and_reports_skipped_images(tmp_path):
    from ffcv.reader import Reader

    root = tmp_path / "imgs"
    names = _bad_folder(root)
    out = tmp_path / "t.beton"
    r = _tool(str(out), "--dataset", "folder", "--root", str(root), "--workers", "2", "--max-bad-fraction", "0.9")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "6 images (4 bad" in r.stdout
    for n in names[1:5]:
        assert n in r.stdout
    assert "decompression bomb" in r.stdout and "aspect ratio" in r.stdout
    assert Reader(str(out)).metadata["f1"].tolist() == [0, 5, 5, 5, 5, 5]

    strict = tmp_path / "s.beton"
    r = _tool(str(strict), "--dataset", "folder", "--root", str(root), "--workers", "2")
    assert r.returncode == 1 and "not written" in r.stderr and "4 of 6 images are bad" in r.stderr
    assert "Traceback" not in r.stderr and not strict.exists()


def test_make_ffcv_pixel_limit(tmp_path, monkeypatch, capsys):
    from tools import make_ffcv

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # main() sets it: restore after
    root = tmp_path / "imgs"
    photo(root / "a.png")
    photo(root / "b.png", h=600, w=400)
    args = [str(tmp_path / "m.beton"), "--dataset", "folder", "--root", str(root), "--workers", "1",
            "--max-bad-fraction", "0.9"]
    make_ffcv.main(args + ["--max-image-pixels", "100000"])  # b.png's 240000 pixels: a bomb at this limit
    out = capsys.readouterr().out
    assert "2 images (1 bad" in out and "b.png: decompression bomb" in out
    make_ffcv.main(args + ["--max-image-pixels", "0"])  # no limit
    assert "2 images (0 bad" in capsys.readouterr().out


def _coord_exif(path: Path, h: int, w: int, orientation: int) -> Path:
    """A JPEG whose upright picture (EXIF applied) is a coordinate image (red = column, green =
    row) of ``h`` x ``w``; the stored pixels are rotated as a phone camera stores them."""
    yy, xx = np.mgrid[0:h, 0:w]
    upright = np.stack([xx, yy, np.full_like(xx, 77)], -1).astype(np.uint8)
    stored = {6: np.rot90(upright, 1), 8: np.rot90(upright, -1), 3: np.rot90(upright, 2)}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(stored)).save(path, quality=100, subsampling=0, exif=exif)
    return path


def test_ffcv_loader_with_bad_last_sample_and_rotated_photos(tmp_path):
    """One .beton: a bomb inside, a corrupt file as the last sample (its replacement wraps around to
    index 0), and EXIF-rotated photos stored upright with crops drawn on the upright size."""
    from ffcv.reader import Reader

    torch.set_num_threads(1)
    root = tmp_path / "imgs"
    sizes = {}
    for k in range(8):
        if k == 2:
            bomb_png(root / f"{k}.png")
        elif k == 7:
            corrupt(root / f"{k}.jpg")
        elif k in (3, 5):
            _coord_exif(root / f"{k}.jpg", 200, 256, 6 if k == 3 else 8)
            sizes[k] = (200, 256)
        else:
            coord_image(root / f"{k}.png")
            sizes[k] = (256, 256)
    files = dataset_files("folder", root)
    beton = tmp_path / "f.beton"
    stats = write_beton(files, beton, max_resolution=None, write_mode="raw", num_workers=1, max_bad_fraction=0.5)
    assert stats["bad"] == 2
    meta = Reader(str(beton)).metadata
    assert meta["f0"]["height"][3] == 200 and meta["f0"]["width"][3] == 256  # stored upright
    cfg = geometric_cfg(root, loader="ffcv", ffcv_path=str(beton), num_workers=1, max_bad_fraction=0.5)
    loader = build_pretrain_loader(cfg, 4, rank=0, world_size=1, seed=3, device=CPU)
    try:
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == 2
            index = torch.cat([b["index"] for b in batches]).tolist()
            assert sorted(index) == [0, 0, 1, 3, 3, 4, 5, 6]
            assert sum(int(b["skipped"].sum()) for b in batches) == 2
            for b in batches:
                # pairs are drawn for the requested index on the stored (upright) size
                req = ((b["index"] - b["skipped"]) % 8).tolist()
                pairs = np.stack([draw_pair(cfg, 3, epoch, r, *sizes[u]) for r, u in zip(req, b["index"].tolist())])
                check_views_against_source(b, pairs, tol=3.0)  # JPEG error on top of resampling
        assert loader.bad_images == 4 and sorted(loader.tracker.bad_files) == [2, 7]
    finally:
        loader.close()
