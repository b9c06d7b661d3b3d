"""PIL two-view path: crop boxes and flips, the overlap rule, resume, distribution, layouts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.data import DataConfig, build_pretrain_loader
from pretrain.data.crops import intersection_boxes
from pretrain.data.datasets import dataset_files
from pretrain.data.two_view import draw_pair
from tests.data_helpers import check_views_against_source, coord_image, geometric_cfg

CPU = torch.device("cpu")


def _loader(cfg, bs=8, **kw):
    args = dict(rank=0, world_size=1, seed=5, device=CPU)
    args.update(kw)
    return build_pretrain_loader(cfg, bs, **args)


def test_views_show_their_boxes(tmp_path):
    for k in range(4):
        coord_image(tmp_path / "imgs" / f"{k}.png")
    cfg = geometric_cfg(tmp_path / "imgs", min_scale=0.08)
    loader = _loader(cfg, bs=4)
    n_flip = 0
    for epoch in range(6):
        loader.set_epoch(epoch)
        for batch in loader:
            idx = batch["index"].tolist()
            pairs = np.stack([draw_pair(cfg, 5, epoch, i, 256, 256) for i in idx])
            check_views_against_source(batch, pairs)
            n_flip += int(batch["flip1"].sum() + batch["flip2"].sum())
            b1, b2 = intersection_boxes(pairs)
            torch.testing.assert_close(batch["box1"], torch.from_numpy(b1))
            torch.testing.assert_close(batch["box2"], torch.from_numpy(b2))
    assert 10 <= n_flip <= 38  # 48 views with flip p = 0.5


def test_flip_box_is_mirrored():
    pair = np.array([10, 20, 100, 80, 0, 50, 40, 60, 120, 0])
    b1, b2 = intersection_boxes(pair)
    flipped = pair.copy()
    flipped[4] = 1
    f1, f2 = intersection_boxes(flipped)
    np.testing.assert_allclose(f1, [1 - b1[2], b1[1], 1 - b1[0], b1[3]], atol=1e-6)
    np.testing.assert_allclose(f2, b2)
    # intersection rows 50..110, cols 40..100 -> in view 1 (rows 10..110, cols 20..100)
    np.testing.assert_allclose(b1, [20 / 80, 40 / 100, 1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(b2, [0.0, 0.0, 60 / 120, 1.0], atol=1e-6)


def test_vertical_flips_show_their_boxes(tmp_path):
    for k in range(4):
        coord_image(tmp_path / "imgs" / f"{k}.png")
    cfg = geometric_cfg(tmp_path / "imgs", min_scale=0.08, vflip_p=0.5)
    loader = _loader(cfg, bs=4)
    codes = []
    for epoch in range(6):
        loader.set_epoch(epoch)
        for batch in loader:
            idx = batch["index"].tolist()
            pairs = np.stack([draw_pair(cfg, 5, epoch, i, 256, 256) for i in idx])
            check_views_against_source(batch, pairs)  # x and y directions checked against the codes
            codes += batch["flip1"].tolist() + batch["flip2"].tolist()
    assert set(codes) == {0, 1, 2, 3}  # every combination of the two flips occurs in 48 views
    assert 10 <= sum(c >= 2 for c in codes) <= 38


@pytest.mark.parametrize("key", ["flip_p", "vflip_p"])
def test_flip_probability_out_of_range_is_named(tmp_path, key):
    coord_image(tmp_path / "imgs" / "a.png", size=16)
    with pytest.raises(ValueError, match=f"data.{key}=1.5"):
        _loader(geometric_cfg(tmp_path / "imgs", **{key: 1.5}), bs=1)


def test_vflip_draws_last():
    """vflip_p = 0 is the horizontal-only sampler; vflip_p > 0 keeps its crops and horizontal flips."""
    off, on = DataConfig(), DataConfig(vflip_p=0.5)
    n_v = 0
    for k in range(300):
        a, b = draw_pair(off, 3, 1, k, 90, 130), draw_pair(on, 3, 1, k, 90, 130)
        assert a[4] in (0, 1) and a[9] in (0, 1)
        np.testing.assert_array_equal(a[[0, 1, 2, 3, 5, 6, 7, 8]], b[[0, 1, 2, 3, 5, 6, 7, 8]])
        np.testing.assert_array_equal(a[[4, 9]], b[[4, 9]] & 1)
        n_v += int((b[4] >> 1) + (b[9] >> 1))
    assert 240 <= n_v <= 360  # 600 views with p = 0.5


def test_vertical_flip_box_is_mirrored():
    pair = np.array([10, 20, 100, 80, 0, 50, 40, 60, 120, 0])
    b1, b2 = intersection_boxes(pair)
    for code in (2, 3):
        flipped = pair.copy()
        flipped[9] = code
        f1, f2 = intersection_boxes(flipped)
        np.testing.assert_allclose(f1, b1)
        x1, x2 = (1 - b2[2], 1 - b2[0]) if code & 1 else (b2[0], b2[2])
        np.testing.assert_allclose(f2, [x1, 1 - b2[3], x2, 1 - b2[1]], atol=1e-6)


@pytest.mark.parametrize("min_overlap", [0.0, 0.01, 0.3, 0.9])
def test_pairs_always_overlap(min_overlap):
    cfg = DataConfig(min_overlap=min_overlap)
    rng = np.random.default_rng(0)
    n_same = n_normal = 0
    for k in range(3000):
        h, w = int(rng.integers(8, 900)), int(rng.integers(8, 900))
        p = draw_pair(cfg, 1, 0, k, h, w)
        i1, j1, h1, w1, _, i2, j2, h2, w2, _ = p.tolist()
        assert 0 <= i1 and i1 + h1 <= h and 0 <= j1 and j1 + w1 <= w
        assert 0 <= i2 and i2 + h2 <= h and 0 <= j2 and j2 + w2 <= w
        inter = max(0, min(i1 + h1, i2 + h2) - max(i1, i2)) * max(0, min(j1 + w1, j2 + w2) - max(j1, j2))
        assert inter > 0 and inter >= min_overlap * h2 * w2
        b1, b2 = intersection_boxes(p)
        assert (b1[2:] > b1[:2]).all() and (b2[2:] > b2[:2]).all()
        assert (b1 >= 0).all() and (b1 <= 1).all() and (b2 >= 0).all() and (b2 <= 1).all()
        # (on extreme aspect ratios torchvision's centre-crop fallback makes equal crops anyway)
        if 0.8 <= w / h <= 1.25 and min(h, w) >= 64:
            n_normal += 1
            n_same += (i1, j1, h1, w1) == (i2, j2, h2, w2)
    if min_overlap <= 0.01:
        assert n_same < 0.01 * n_normal  # the rule is met by drawing, not by copying view 1


def test_flip_probability_extremes(tmp_path):
    cfg0, cfg1 = DataConfig(flip_p=0.0), DataConfig(flip_p=1.0)
    assert all(draw_pair(cfg0, 0, 0, k, 100, 120)[[4, 9]].sum() == 0 for k in range(200))
    assert all(draw_pair(cfg1, 0, 0, k, 100, 120)[[4, 9]].sum() == 2 for k in range(200))


def test_resume_and_determinism(tmp_path):
    from pretrain.data.toy_scenes import make_toy_scenes

    root = make_toy_scenes(tmp_path / "toy", n_train=24, n_val=1, size=48, seed=0)
    cfg = DataConfig(dataset="toy", root=str(root), image_size=32, num_workers=1)
    loader = _loader(cfg, bs=4)
    assert len(loader) == 6
    loader.set_epoch(2)
    full = list(loader)
    resumed = list(loader.iter_from(3))
    assert len(full) == 6 and len(resumed) == 3
    for a, b in zip(full[3:], resumed):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    again = _loader(cfg, bs=4)
    again.set_epoch(2)
    first = next(iter(again))
    torch.testing.assert_close(first["view1"], full[0]["view1"], rtol=0, atol=0)
    again.set_epoch(3)
    assert not torch.equal(next(iter(again))["view1"], full[0]["view1"])
    again.close()
    loader.close()
    assert loader.loader._iterator is None
    # the photometric augmentations are on: views of one image differ beyond the crop
    assert full[0]["view1"].std() > 0.3


def test_distributed_shards(tmp_path):
    for k in range(10):
        coord_image(tmp_path / "imgs" / f"{k}.png", size=16)
    cfg = geometric_cfg(tmp_path / "imgs", image_size=8)
    seen = []
    for rank in range(3):
        loader = _loader(cfg, bs=2, rank=rank, world_size=3, drop_last=False)
        assert len(loader) == 2  # ceil(10 / 3) = 4 samples per rank
        loader.set_epoch(1)
        seen.append(torch.cat([b["index"] for b in loader]).tolist())
    flat = sorted(sum(seen, []))
    assert set(flat) == set(range(10)) and len(flat) == 12  # padded like DistributedSampler


def test_layouts(tmp_path):
    for sub in ("train2017", "unlabeled2017", "train/n01", "train/n02"):
        coord_image(tmp_path / sub / "a.jpg", size=8)
    (tmp_path / "train2017" / "notes.txt").write_text("not an image")
    assert len(dataset_files("coco", tmp_path)) == 1
    assert len(dataset_files("cocoplus", tmp_path)) == 2
    assert len(dataset_files("imagenet", tmp_path)) == 2
    assert len(dataset_files("folder", tmp_path)) == 4
    with pytest.raises(FileNotFoundError, match="nowhere.*train2017"):
        dataset_files("coco", tmp_path / "nowhere")
    (tmp_path / "empty" / "train2017").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no image files"):
        dataset_files("toy", tmp_path / "empty")
    with pytest.raises(ValueError, match="data.dataset"):
        dataset_files("cifar", tmp_path)


def test_config_errors_name_the_key(tmp_path):
    coord_image(tmp_path / "imgs" / "a.png", size=16)
    for bad, key in ((dict(min_scale=0.9, max_scale=0.5), "data.min_scale"), (dict(min_overlap=1.5), "data.min_overlap"),
                     (dict(blur_p=[1.0]), "data.blur_p"), (dict(loader="dali"), "data.loader")):
        with pytest.raises(ValueError, match=key):
            _loader(geometric_cfg(tmp_path / "imgs", **bad))


def test_omegaconf_config_is_accepted(tmp_path):
    from omegaconf import OmegaConf

    coord_image(tmp_path / "imgs" / "a.png", size=16)
    node = OmegaConf.structured(geometric_cfg(tmp_path / "imgs", image_size=8))
    batch = next(iter(_loader(node, bs=1)))
    assert batch["view1"].shape == (1, 3, 8, 8)


def test_too_few_images_for_a_batch(tmp_path):
    coord_image(tmp_path / "imgs" / "a.png", size=16)
    with pytest.raises(ValueError, match="fewer than the per-rank batch size 4"):
        _loader(geometric_cfg(tmp_path / "imgs"), bs=4)
