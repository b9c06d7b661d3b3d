"""tools/ap_margin_bootstrap.py: known APs on a hand-made validation set, and a zero spread for identical runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import ap_margin_bootstrap as amb  # noqa: E402


def _boxes(i: int) -> list[list[float]]:
    return [[10.0 + i, 10.0, 30.0, 30.0], [60.0, 50.0 + i, 40.0, 20.0]]


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Six images, two boxes each; run A finds every box, run B only those of the first three images."""
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": 128, "width": 128} for i in range(1, 7)]
    anns = [{"id": 10 * i + j, "image_id": i, "category_id": 1 + j, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for i in range(1, 7) for j, b in enumerate(_boxes(i))]
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": images, "annotations": anns,
                              "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    runs = []
    for name, found in (("a", range(1, 7)), ("b", range(1, 4))):
        dets = [{"image_id": i, "category_id": 1 + j, "bbox": b, "score": 0.9}
                for i in found for j, b in enumerate(_boxes(i))]
        (tmp_path / name / "inference").mkdir(parents=True)
        (tmp_path / name / "inference" / "coco_instances_results.json").write_text(json.dumps(dets))
        runs.append(tmp_path / name)
    return gt, runs[0], runs[1]


def test_known_margin_and_spread(setup) -> None:
    gt, a, b = setup
    r = amb.bootstrap_margin(gt, a, b, samples=20)
    assert r["ap_a"] == pytest.approx(100.0)
    # B recalls half of each class at precision 1: COCO's 101-point AP is 51/101 of full.
    assert r["ap_b"] == pytest.approx(100.0 * 51 / 101, abs=0.01)
    assert r["margin"] == pytest.approx(r["ap_a"] - r["ap_b"])
    assert r["stderr"] > 1.0 and r["lo"] < r["margin"] < r["hi"] + 1e-9


def test_identical_runs_have_no_spread(setup) -> None:
    gt, a, _ = setup
    r = amb.bootstrap_margin(gt, a, a, samples=10)
    assert (r["margin"], r["stderr"], r["lo"], r["hi"]) == (0.0, 0.0, 0.0, 0.0)


def test_missing_results_exit_2(setup, tmp_path: Path, capsys) -> None:
    gt, a, _ = setup
    assert amb.main([str(gt), str(a), str(tmp_path / "nowhere")]) == 2
    assert "coco_instances_results.json not found" in capsys.readouterr().err
