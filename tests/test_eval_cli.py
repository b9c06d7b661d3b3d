"""``python -m pretrain.eval`` end to end on a tiny SlotCon checkpoint (real config dict) and toy scenes;
``tools/visualize_slots.py`` on the same checkpoint; the overlay function's colours."""
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config, to_dict
from pretrain.data.toy_scenes import make_toy_scenes
from pretrain.eval.__main__ import main
from pretrain.eval.datasets import ToySemantic
from pretrain.eval.inference import load_method
from pretrain.eval.unsup_seg import evaluate_unsup_seg
from pretrain.eval.visualize import IMAGENET_MEAN, IMAGENET_STD, overlay_assignments, palette
from pretrain.methods import build_method

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalcli")
    toy = make_toy_scenes(d / "toy", n_train=2, n_val=4, size=64, seed=0)
    cfg = load_config(ROOT / "configs/pretrain/demo_cpu.yaml",
                      ["model.num_prototypes=8", "model.dim_hidden=32", "model.dim_out=16", "train.seed=3"])
    torch.manual_seed(123)  # a different init from the run's seed: the "trained" weights differ
    method = build_method(cfg.model)
    run = d / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "ckpt_00000007.pth"
    torch.save({"model": method.state_dict(), "optimizer": {}, "scaler": {}, "step": 7, "epoch": 0,
                "step_in_epoch": 7, "rng": {}, "config": to_dict(cfg)}, ckpt)
    return toy, run, ckpt


def test_unsup_seg_cli_matches_library(tiny):
    toy, run, ckpt = tiny
    out = run / "res.json"
    res = main(["unsup_seg", str(run), str(toy), "--compare-random", "--no-progress", "--batch-size", "3",
                "--device", "cpu", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["checkpoint"] == str(ckpt) and saved["num_images"] == 4
    for name in ("pretrained", "random_init"):
        r = saved[name]
        assert r["num_pixels"] == 4 * 64 * 64 and r["num_prototypes"] == 8 and r["num_classes"] == 6
        assert 0.0 <= r["miou"] <= 100.0 and 0.0 <= r["pacc"] <= 100.0
    ds = ToySemantic(toy)
    trained, _ = load_method(ckpt, torch.device("cpu"))
    direct = evaluate_unsup_seg(trained, ds, batch_size=4, device=torch.device("cpu"), progress=False)
    assert res["pretrained"]["miou"] == pytest.approx(direct["miou"])
    # random init reproduces the run's starting weights (train.seed=3), not the checkpoint's
    rnd, _ = load_method(ckpt, torch.device("cpu"), random_init=True)
    torch.manual_seed(3)
    fresh = build_method(load_config(ROOT / "configs/pretrain/demo_cpu.yaml", [
        "model.num_prototypes=8", "model.dim_hidden=32", "model.dim_out=16"]).model)
    for (k, a), b in zip(rnd.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    assert not torch.equal(rnd.teacher_prototypes.weight, trained.teacher_prototypes.weight)


def test_discovery_and_retrieval_cli(tiny, tmp_path):
    toy, run, ckpt = tiny
    d = main(["discovery", str(ckpt), str(toy), "--no-progress", "--device", "cpu", "--out", str(tmp_path / "d.json")])
    assert d["pretrained"]["num_images"] == 4 and -100.0 <= d["pretrained"]["ari_fg"] <= 100.0
    assert 0.0 <= d["pretrained"]["miou_otsu"] <= 100.0
    r = main(["retrieval", str(ckpt), str(toy), "--no-progress", "--device", "cpu", "--out", str(tmp_path / "r.json")])
    grids = Path(r["pretrained"]["dir"])
    listing = json.loads((grids / "retrieval.json").read_text())
    assert len(listing["prototypes"]) == 8 and listing["num_segments"] == r["pretrained"]["num_segments"]
    assert all(len(p["segments"]) == min(5, listing["num_segments"]) for p in listing["prototypes"])
    assert (grids / "overview.png").is_file() and len(list(grids.glob("proto_*.png"))) == 8


def test_cli_rejects_exported_backbone(tiny, tmp_path):
    toy, _, ckpt = tiny
    exported = tmp_path / "backbone.pth"
    torch.save({"backbone": {}, "arch": "resnet18"}, exported)
    with pytest.raises(KeyError, match="not a full training checkpoint"):
        main(["unsup_seg", str(exported), str(toy), "--no-progress", "--device", "cpu"])


def test_visualize_slots_tool(tiny, tmp_path, monkeypatch):
    toy, _, ckpt = tiny
    imgs = sorted((toy / "val2017").glob("*.jpg"))[:2]
    out = tmp_path / "viz"
    # run as a script (as a user would), in this process to spare a second interpreter start
    argv = [str(ROOT / "tools/visualize_slots.py"), str(ckpt), *map(str, imgs), "--out", str(out),
            "--device", "cpu", "--size", "64"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(argv[0], run_name="__main__")
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [f"{p.stem}_slots.png" for p in imgs]


def test_overlay_colours_and_boundaries():
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    img01 = torch.full((1, 3, 8, 8), 0.5)
    images = (img01 - mean) / std
    assign = torch.zeros(1, 3, 8, 8)
    assign[0, 2, :, :4] = 1.0
    assign[0, 1, :, 4:] = 1.0
    out = overlay_assignments(images, assign, alpha=0.5, boundaries=True)
    pal = palette(3)
    assert out.shape == (1, 3, 8, 8) and 0.0 <= out.min() and out.max() <= 1.0
    assert torch.allclose(out[0, :, 0, 0], 0.25 + 0.5 * pal[2], atol=1e-5)
    assert torch.allclose(out[0, :, 0, 7], 0.25 + 0.5 * pal[1], atol=1e-5)
    assert torch.allclose(out[0, :, :, 4], torch.ones(3, 8))  # boundary column drawn white
