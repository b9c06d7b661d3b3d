"""pretrain.demo_seeds: the demo's transfer pairs repeated over fine-tune seeds (runs faked; the real commands are
``pretrain.demo.transfer_runs``'s, run by the slow demo tests)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import pretrain.demo_seeds as demo_seeds
from pretrain.demo_seeds import margins, seeded


def test_margins_per_seed_mean_and_sd() -> None:
    per_seed = {
        0: {"det_full_pretrained_AP_b": 18.0, "det_full_random_AP_b": 15.0, "seg_full_pretrained_mIoU": 60.0,
            "seg_full_random_mIoU": 55.0},
        1: {"det_full_pretrained_AP_b": 16.0, "det_full_random_AP_b": 16.0, "seg_full_pretrained_mIoU": None,
            "seg_full_random_mIoU": 50.0},
        2: {"det_full_pretrained_AP_b": 17.0, "det_full_random_AP_b": 14.0},
    }
    m = margins(per_seed)
    assert m["det_full_AP_b"]["per_seed"] == {0: 3.0, 1: 0.0, 2: 3.0}
    assert m["det_full_AP_b"]["mean"] == pytest.approx(2.0)
    assert m["det_full_AP_b"]["sd"] == pytest.approx(3.0 ** 0.5)  # sample SD of 3, 0, 3
    # a metric missing at a seed is left out of that seed; one seed has no SD
    assert m["seg_full_mIoU"] == {"per_seed": {0: 5.0}, "mean": 5.0, "sd": None}


def test_seed_override_per_framework() -> None:
    assert seeded("detectron2 full", ["python", "-m", "transfer.detection", "X", "Y"], 3)[-2:] == ["SEED", "3"]
    assert seeded("mmseg frozen", ["python", "-m", "transfer.segmentation"], 3)[-1] == "randomness.seed=3"


def _demo_out(tmp_path: Path) -> tuple[Path, Path]:
    out, data = tmp_path / "demo", tmp_path / "toy"
    out.mkdir()
    data.mkdir()
    (data / "meta.json").write_text("{}")
    for name in ("backbone_d2.pkl", "backbone_mmseg.pth", "random_init_d2.pkl", "random_init_mmseg.pth"):
        (out / name).write_bytes(b"")
    return out, data


def test_runs_every_pair_at_every_seed_then_keeps_them(tmp_path: Path, monkeypatch, capsys) -> None:
    out, data = _demo_out(tmp_path)
    calls: list[list[str]] = []

    def fake_pair(cmds, logs, timings, name):
        for init, cmd in cmds.items():
            calls.append(cmd)
            seed = int(cmd[-1]) if cmd[-2] == "SEED" else int(cmd[-1].split("=")[1])
            gain = seed if init == "pretrained" else 0.0
            if "transfer.detection" in cmd:
                d = Path(cmd[cmd.index("--output-dir") + 1])
                rec = {"bbox": {"AP": 10.0 + gain}, "segm": {"AP": 8.0 + gain}}
            else:
                d = Path(cmd[cmd.index("--work-dir") + 1])
                rec = {"metrics": {"mIoU": 50.0 + 2 * gain}}
            d.mkdir(parents=True, exist_ok=True)
            (d / "metrics.json").write_text(json.dumps(rec))

    monkeypatch.setattr(demo_seeds, "_run_pair", fake_pair)
    args = [str(out), "--data", str(data), "--seeds", "1", "3", "--pairs", "det-full", "seg-frozen"]
    assert demo_seeds.main(args) == 0
    assert len(calls) == 2 * 2 * 2  # seeds x pairs x inits
    assert {c[-1] for c in calls if "transfer.detection" in c} == {"1", "3"}
    assert all("+model.backbone.frozen_stages=4" in c for c in calls if "transfer.segmentation" in c)
    spread = json.loads((out / "seed_spread" / "seed_spread.json").read_text())["margins"]
    assert spread["det_full_AP_b"]["per_seed"] == {"1": 1.0, "3": 3.0}
    assert spread["seg_frozen_mIoU"]["mean"] == pytest.approx(4.0)
    assert set(spread) == {"det_full_AP_b", "det_full_AP_m", "seg_frozen_mIoU"}
    assert "| det_full_AP_b | +1.0 | +3.0 | +2.0 (1.4) |" in (out / "seed_spread" / "seed_spread.md").read_text()
    # a second call keeps the finished pairs
    calls.clear()
    assert demo_seeds.main(args) == 0
    assert calls == []
    assert "done earlier, kept" in capsys.readouterr().out


def test_refuses_a_folder_without_the_demo_weights(tmp_path: Path, capsys) -> None:
    out, data = _demo_out(tmp_path)
    (out / "random_init_d2.pkl").unlink()
    with pytest.raises(SystemExit) as e:
        demo_seeds.main([str(out), "--data", str(data)])
    assert e.value.code == 2
    assert "random_init_d2.pkl not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        demo_seeds.main([str(out), "--data", str(data), "--seeds", "1", "1"])
    assert e.value.code == 2
