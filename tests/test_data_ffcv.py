"""FFCV path: boxes and flips on coordinate images, the same crops and batch structure as the
PIL path, resume, and the .beton writer's handling of bad files. One FFCV loader is compiled for
the whole module (numba compilation dominates the runtime)."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.data import build_pretrain_loader
from pretrain.data.datasets import BadImageError, dataset_files
from pretrain.data.ffcv_writer import write_beton
from pretrain.data.two_view import draw_pair
from tests.data_helpers import check_views_against_source, coord_image, geometric_cfg

CPU = torch.device("cpu")
N_IMG = 12


@pytest.fixture(scope="module")
def coord_setup(tmp_path_factory):
    torch.set_num_threads(1)  # the numba decode threads need the cores
    root = tmp_path_factory.mktemp("coord") / "imgs"
    for k in range(N_IMG):
        coord_image(root / f"{k:02d}.png")
    beton = root.parent / "coord.beton"
    write_beton(dataset_files("folder", root), beton, max_resolution=None, write_mode="raw", num_workers=1)
    cfg = geometric_cfg(root, loader="ffcv", ffcv_path=str(beton), num_workers=2)
    loader = build_pretrain_loader(cfg, 4, rank=0, world_size=1, seed=9, device=CPU)
    yield root, cfg, loader
    loader.close()


def test_ffcv_views_show_their_boxes(coord_setup):
    _, cfg, loader = coord_setup
    assert len(loader) == N_IMG // 4
    n_flip = 0
    for epoch in (0, 1, 2):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 3
        for batch in batches:
            idx = batch["index"].tolist()
            pairs = np.stack([draw_pair(cfg, 9, epoch, i, 256, 256) for i in idx])
            check_views_against_source(batch, pairs)
            n_flip += int(batch["flip1"].sum() + batch["flip2"].sum())
        assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(N_IMG))
    assert 20 <= n_flip <= 52  # 72 views, flip p = 0.5


def test_ffcv_matches_pil_crops_and_structure(coord_setup):
    root, cfg, loader = coord_setup
    pil = build_pretrain_loader(dataclasses.replace(cfg, loader="pil", num_workers=0), 4, rank=0,
                                world_size=1, seed=9, device=CPU)
    for ld in (loader, pil):
        ld.set_epoch(4)
    fb, pb = next(iter(loader)), next(iter(pil))
    assert fb.keys() == pb.keys()
    for k in fb:
        assert fb[k].dtype == pb[k].dtype and fb[k].shape == pb[k].shape, k
    # same sampler, same crop draws: identical order, flips and boxes on both paths
    for k in ("index", "flip1", "flip2", "box1", "box2", "skipped"):
        torch.testing.assert_close(fb[k], pb[k], rtol=0, atol=0)
    # pixels differ only by resampling (INTER_AREA vs bicubic): compare decoded coordinates
    assert (fb["view1"] - pb["view1"]).abs().mean() < 0.05


def test_ffcv_vertical_flips_match_pil(coord_setup):
    root, cfg, _ = coord_setup
    vcfg = dataclasses.replace(cfg, vflip_p=0.5)
    ffcv = build_pretrain_loader(vcfg, 4, rank=0, world_size=1, seed=9, device=CPU)
    pil = build_pretrain_loader(dataclasses.replace(vcfg, loader="pil", num_workers=0), 4, rank=0,
                                world_size=1, seed=9, device=CPU)
    try:
        codes = []
        for epoch in (0, 1):
            for ld in (ffcv, pil):
                ld.set_epoch(epoch)
            for fb, pb in zip(ffcv, pil):
                idx = fb["index"].tolist()
                pairs = np.stack([draw_pair(vcfg, 9, epoch, i, 256, 256) for i in idx])
                check_views_against_source(fb, pairs)
                for k in ("index", "flip1", "flip2", "box1", "box2"):
                    torch.testing.assert_close(fb[k], pb[k], rtol=0, atol=0)
                assert (fb["view1"] - pb["view1"]).abs().mean() < 0.05
                codes += fb["flip1"].tolist() + fb["flip2"].tolist()
        assert {2, 3} & set(codes) and {0, 1} & set(codes)
    finally:
        ffcv.close()
        pil.close()


def test_ffcv_photometric_ranges_match_pil(coord_setup):
    root, cfg, loader = coord_setup
    on = dict(color_jitter_p=0.8, grayscale_p=0.2, blur_p=[1.0, 0.1], solarize_p=[0.0, 0.2])
    saved = {k: getattr(loader.cfg, k) for k in on}
    for k, v in on.items():
        setattr(loader.cfg, k, v)  # photometric augs run on the host: no recompilation needed
    try:
        loader.set_epoch(0)
        fb = next(iter(loader))
    finally:
        for k, v in saved.items():
            setattr(loader.cfg, k, v)
    pil = build_pretrain_loader(dataclasses.replace(cfg, loader="pil", num_workers=0, **on), 4, rank=0,
                                world_size=1, seed=9, device=CPU)
    pb = next(iter(pil))
    lo, hi = -0.485 / 0.229 - 1e-4, (1 - 0.406) / 0.225 + 1e-4
    for b in (fb, pb):
        for v in ("view1", "view2"):
            assert b[v].min() >= lo and b[v].max() <= hi and torch.isfinite(b[v]).all()
    # identical photometric parameters on both paths: per-image means agree closely
    torch.testing.assert_close(fb["view1"].mean((1, 2, 3)), pb["view1"].mean((1, 2, 3)), atol=0.05, rtol=0)


def test_ffcv_resume(coord_setup):
    _, _, loader = coord_setup
    loader.set_epoch(7)
    full = list(loader)
    tail = list(loader.iter_from(1))
    assert len(tail) == 2
    for a, b in zip(full[1:], tail):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # abandoning an epoch part-way and starting another is safe
    it = loader.iter_from(0)
    next(it)
    it.close()
    loader.set_epoch(7)
    again = list(loader)
    torch.testing.assert_close(again[2]["view2"], full[2]["view2"], rtol=0, atol=0)


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_writer_replaces_counts_and_bounds_bad_files(tmp_path):
    from ffcv.reader import Reader

    root = tmp_path / "imgs"
    root.mkdir()
    for k in range(6):
        (root / f"{k}.jpg").write_bytes(_jpeg(k) if k not in (2, 3) else b"broken")
    (root / "notes.txt").write_text("x")
    out = tmp_path / "d.beton"
    stats = write_beton(dataset_files("folder", root), out, num_workers=1, max_bad_fraction=0.5)
    assert stats["images"] == 6 and stats["bad"] == 2
    assert stats["bad_files"] == [str(root / "2.jpg"), str(root / "3.jpg")]
    assert all(e.startswith(str(root)) and ": " in e for e in stats["examples"])
    meta = Reader(str(out)).metadata
    assert meta["f1"].tolist() == [0, 1, 4, 4, 4, 5]  # 2 and 3 replaced by the next good image
    assert meta["f2"].tolist() == [0, 0, 2, 1, 0, 0]  # skipped counts, as on the PIL path
    strict = tmp_path / "s.beton"
    with pytest.raises(BadImageError, match=r"2 of 6 images.*imgs/2\.jpg"):
        write_beton(dataset_files("folder", root), strict, num_workers=1, max_bad_fraction=0.1)
    assert not strict.exists() and not list(tmp_path.glob(".s.beton.tmp-*"))


def test_missing_beton_is_a_clear_error(tmp_path):
    cfg = geometric_cfg(tmp_path, loader="ffcv", ffcv_path=str(tmp_path / "none.beton"))
    with pytest.raises(FileNotFoundError, match="none.beton.*make_ffcv.py"):
        build_pretrain_loader(cfg, 2, rank=0, world_size=1, seed=0, device=CPU)
