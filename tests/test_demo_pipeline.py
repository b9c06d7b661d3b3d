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
                           "--transfer-iters", "2", "train.max_steps=3", "optim.batch_size=16"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pretrain_steps"] == 3
    # every transfer run wrote its metrics (a few iterations: the values are not a comparison)
    for task, metrics in (("det", ("AP_b", "AP_m")), ("seg", ("mIoU",))):
        for mode in ("full", "frozen"):
            for init in ("pretrained", "random"):
                for m in metrics:
                    assert isinstance(summary[f"{task}_{mode}_{init}_{m}"], float), (task, mode, init, m)
    # the pretrained runs start from the converted teacher, the random ones from the run's initial encoder
    det = json.loads((out / "transfer" / "det_full_random" / "metrics.json").read_text())
    assert det["weights"].endswith("random_init_d2.pkl")
    seg_log = (out / "logs" / "mmseg_full_pretrained.log").read_text()
    assert "ResNetStemVariant(stem_pool=False)" in seg_log
    for path in summary["artefacts"].values():
        assert Path(path).exists(), path
    assert len(list((out / "slot_pictures").glob("*.png"))) == 4
    # the same pairs over fine-tune seeds (pretrain.demo_seeds): the seed reaches both frameworks' configs
    seeds = subprocess.run([sys.executable, "-m", "pretrain.demo_seeds", str(out), "--data", str(data),
                            "--seeds", "0", "1", "--pairs", "det-frozen", "seg-frozen", "--transfer-iters", "2"],
                           cwd=ROOT, capture_output=True, text=True)
    assert seeds.returncode == 0, seeds.stdout[-3000:] + seeds.stderr[-3000:]
    spread_dir = out / "seed_spread_iters2"
    spread = json.loads((spread_dir / "seed_spread.json").read_text())["margins"]
    assert set(spread) == {"det_frozen_AP_b", "det_frozen_AP_m", "seg_frozen_mIoU"}
    assert all(set(row["per_seed"]) == {"0", "1"} for row in spread.values())
    d2_cfg = (spread_dir / "seed1" / "transfer" / "det_frozen_random" / "config.yaml").read_text()
    assert "\nSEED: 1\n" in d2_cfg
    seg_cfg = next((spread_dir / "seed1" / "transfer" / "seg_frozen_pretrained").glob("*.py")).read_text()
    assert "randomness = dict(seed=1)" in seg_cfg
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
    runs = {"detectron2 full": {"pretrained": ([], tmp_path / "det" / "metrics.json")},
            "mmseg frozen": {"random": ([], tmp_path / "seg" / "metrics.json")}}
    for d, m in ((tmp_path / "det", {"bbox": {"AP": 1.0}, "segm": {"AP": 0.5}}),
                 (tmp_path / "seg", {"metrics": {"mIoU": 2.0}})):
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps(m))
    assert transfer_metrics(runs, ran=True) == {"det_full_pretrained_AP_b": 1.0, "det_full_pretrained_AP_m": 0.5,
                                                "seg_frozen_random_mIoU": 2.0}
    assert set(transfer_metrics(runs, ran=False).values()) == {None}
