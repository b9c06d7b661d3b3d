"""``make demo`` end to end at a few steps: every stage runs and the summary names every artefact."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path: Path) -> None:
    from pretrain.data.toy_scenes import make_toy_scenes

    data = tmp_path / "toy"
    make_toy_scenes(data, n_train=64, n_val=8, size=96, seed=0)
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "pretrain.demo", "--out", str(out), "--data", str(data),
                           "train.max_steps=3", "optim.batch_size=16"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pretrain_steps"] == 3
    for key in ("unsup_miou_pretrained", "unsup_miou_random", "det_bbox_AP", "det_segm_AP", "seg_mIoU"):
        assert summary[key] is not None and 0.0 <= summary[key] <= 100.0, key
    for path in summary["artefacts"].values():
        assert Path(path).exists(), path
    assert len(list((out / "slot_pictures").glob("*.png"))) == 4
    assert "tensorboard --logdir" in proc.stdout
    assert list((Path(summary["artefacts"]["tensorboard"])).glob("events.out.tfevents.*"))


def test_demo_rebuilds_stale_toy_scenes_and_ignores_stale_metrics(tmp_path: Path) -> None:
    from pretrain.data.toy_scenes import TOY_VERSION, make_toy_scenes
    from pretrain.demo import toy_scenes_command, transfer_metrics

    data = tmp_path / "toy"
    assert toy_scenes_command("py", data) == ["py", "tools/make_toy_scenes.py", str(data)]
    make_toy_scenes(data, n_train=3, n_val=2, size=40, seed=5)
    assert toy_scenes_command("py", data) is None
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "version": TOY_VERSION - 1}))
    # an older renderer's set is rebuilt with its own sizes, not replaced by the default one
    assert toy_scenes_command("py", data) == ["py", "tools/make_toy_scenes.py", str(data), "--n-train", "3",
                                              "--n-val", "2", "--size", "40", "--seed", "5"]
    det, seg = tmp_path / "det", tmp_path / "seg"
    for d, m in ((det, {"bbox": {"AP": 1.0}}), (seg, {"metrics": {"mIoU": 2.0}})):
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps(m))
    assert transfer_metrics(det, seg, ran=True) == ({"bbox": {"AP": 1.0}}, {"metrics": {"mIoU": 2.0}})
    assert transfer_metrics(det, seg, ran=False) == ({}, {})
