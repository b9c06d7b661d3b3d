"""Toy scenes: deterministic for a seed, idempotent, and image/label maps/COCO JSON agree."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pretrain.data.toy_scenes import CLASS_NAMES, load_meta, make_toy_scenes, render_scene


def test_render_scene_deterministic_and_consistent():
    a = render_scene(np.random.default_rng(7), 64)
    b = render_scene(np.random.default_rng(7), 64)
    c = render_scene(np.random.default_rng(8), 64)
    for x, y in zip(a[:3], b[:3]):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    image, semantic, instance, objects = a
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert semantic.shape == instance.shape == (64, 64)
    assert len(objects) >= 1
    # instance ids are exactly 1..n, and each instance has a single class equal to its category
    assert sorted(np.unique(instance[instance > 0]).tolist()) == list(range(1, len(objects) + 1))
    for obj in objects:
        m = instance == obj["instance_id"]
        np.testing.assert_array_equal(m, obj["mask"])
        assert set(np.unique(semantic[m]).tolist()) == {obj["category_id"]}
        assert obj["area"] == int(m.sum())
    np.testing.assert_array_equal(semantic > 0, instance > 0)


def test_render_scene_nonsquare():
    image, semantic, _, _ = render_scene(np.random.default_rng(0), (80, 48))
    assert image.shape == (48, 80, 3) and semantic.shape == (48, 80)


def test_make_toy_scenes_layout_and_coco(tmp_path):
    root = make_toy_scenes(tmp_path / "toy", n_train=12, n_val=4, size=48, seed=3)
    meta = load_meta(root)
    assert meta["classes"] == list(CLASS_NAMES) and meta["seed"] == 3 and meta["n_train"] == 12
    for split, n in (("train2017", 12), ("val2017", 4)):
        coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        assert len(coco["images"]) == n == len(list((root / split).glob("*.jpg")))
        assert [c["id"] for c in coco["categories"]] == list(range(1, len(CLASS_NAMES)))
        by_image: dict[int, list] = {}
        for ann in coco["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        for info in coco["images"]:
            stem = info["file_name"][:-4]
            sem = np.asarray(Image.open(root / "semantic" / split / f"{stem}.png"))
            ins = np.asarray(Image.open(root / "instances" / split / f"{stem}.png"))
            img = Image.open(root / split / info["file_name"])
            assert img.size == (info["width"], info["height"]) == (48, 48)
            anns = by_image.get(info["id"], [])
            assert len(anns) == int(ins.max())
            for k, ann in enumerate(anns, start=1):
                m = mask_utils.decode(ann["segmentation"]).astype(bool)
                np.testing.assert_array_equal(m, ins == k)
                assert (sem[m] == ann["category_id"]).all()
                assert ann["area"] == m.sum()
                x, y, w, h = ann["bbox"]
                ys, xs = np.nonzero(m)
                assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)


def test_make_toy_scenes_deterministic_and_idempotent(tmp_path):
    r1 = make_toy_scenes(tmp_path / "a", n_train=5, n_val=2, size=40, seed=11)
    r2 = make_toy_scenes(tmp_path / "b", n_train=5, n_val=2, size=40, seed=11)
    f = "train2017/000000000004.jpg"
    assert (r1 / f).read_bytes() == (r2 / f).read_bytes()
    mtime = (r1 / "meta.json").stat().st_mtime_ns
    make_toy_scenes(r1, n_train=5, n_val=2, size=40, seed=11)
    assert (r1 / "meta.json").stat().st_mtime_ns == mtime  # skipped
    make_toy_scenes(r1, n_train=6, n_val=2, size=40, seed=12)  # different request: rebuilt
    assert load_meta(r1)["seed"] == 12 and len(list((r1 / "train2017").glob("*.jpg"))) == 6
    assert not [p for p in r1.iterdir() if p.name.startswith(".toy-")]


def test_concurrent_callers_get_one_complete_dataset(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        roots = list(pool.map(lambda _: make_toy_scenes(tmp_path / "c", n_train=6, n_val=2, size=32, seed=1), range(3)))
    assert all(r == roots[0] for r in roots)
    assert len(list((roots[0] / "train2017").glob("*.jpg"))) == 6
    assert load_meta(roots[0])["n_train"] == 6
    assert not [p for p in roots[0].iterdir() if p.name.startswith(".toy-")]


def test_stale_renderer_version_is_named(tmp_path):
    import pytest
    import torch

    from pretrain.data import DataConfig, build_pretrain_loader
    from pretrain.data.toy_scenes import TOY_VERSION, stale_version_message

    root = make_toy_scenes(tmp_path / "t", n_train=2, n_val=1, size=32, seed=0)
    assert stale_version_message(root) is None
    assert stale_version_message(tmp_path / "absent") is None
    meta = json.loads((root / "meta.json").read_text())
    (root / "meta.json").write_text(json.dumps({**meta, "version": TOY_VERSION - 1}))
    msg = stale_version_message(root)
    assert msg and f"version {TOY_VERSION - 1}" in msg and "make_toy_scenes.py" in msg
    cfg = DataConfig(dataset="toy", root=str(root), image_size=16, num_workers=0)
    with pytest.warns(UserWarning, match="renderer version"):  # the pretraining loader says so too
        build_pretrain_loader(cfg, 1, rank=0, world_size=1, seed=0, device=torch.device("cpu")).close()
