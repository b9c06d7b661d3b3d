"""The CPU demo's learning signal (issue 11): with the demo's default settings and seed, pretraining
lowers the loss, keeps the teacher's assignments away from the uniform collapse, and SlotCon's unsupervised
segmentation of held-out toy scenes beats the same network at random initialisation. A broken loss,
alignment or teacher update shows up here first (with the paper's LR at this scale the pretrained mIoU fell
below random init; with tau_t 0.07 the assignments went uniform, entropy ln K, while the mIoU still looked fine).

It asserts the issue's goal for the default seed: at least 10 mIoU points over random init (the README
lists the numbers of three seeds). Without vertical flips, or with the old background-dominated scenes,
the gain was 1-4 points; the entropy check catches a collapsed grouping that a lucky mIoU could hide.

Slow (7 minutes of pretraining on 2 quiet cores with AVX512-BF16, about 17 in float32 on an AVX2-only CPU):
it runs the real ``python -m pretrain`` and ``python -m pretrain.eval`` commands of ``make demo``. With the
residual blocks zero-initialised (the official recipe, now the demo's) seed 0 gave 50.8 vs 12.6 in float32.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_pretraining_beats_random_init(tmp_path: Path) -> None:
    from pretrain.data.toy_scenes import make_toy_scenes

    data = tmp_path / "toy"
    make_toy_scenes(data, n_train=256, n_val=64, size=128, seed=0)  # the demo's defaults
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "pretrain", "configs/pretrain/demo_cpu.yaml", f"data.root={data}",
                    f"train.run_dir={run}"], cwd=ROOT, check=True, capture_output=True)
    out = tmp_path / "unsup.json"
    subprocess.run([sys.executable, "-m", "pretrain.eval", "unsup_seg", str(run), str(data), "--compare-random",
                    "--no-progress", "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    res = json.loads(out.read_text())
    pre, rnd = res["pretrained"]["miou"], res["random_init"]["miou"]
    assert pre >= rnd + 10.0, f"pretrained mIoU {pre:.1f} vs random init {rnd:.1f}: less than 10 points apart"
    # The training loss fell over the run (first vs last 10 steps).
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first = sum(r["loss"] for r in rows[:10]) / 10
    last = sum(r["loss"] for r in rows[-10:]) / 10
    assert last < first - 0.15, (first, last)
    # The teacher's assignments did not collapse to uniform (entropy ln K: every pixel equally on every
    # prototype, which centering alone allows; the demo's former tau_t 0.07 ended there at 1.77 of 1.79).
    from omegaconf import OmegaConf

    k = int(OmegaConf.load(run / "config.yaml").model.num_prototypes)
    entropy = sum(r["entropy"] for r in rows[-10:]) / 10
    assert entropy < 0.8 * math.log(k), f"teacher assignment entropy {entropy:.2f} is near uniform (ln K = {math.log(k):.2f})"
