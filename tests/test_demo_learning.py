"""The CPU demo's learning and transfer signal: ``python -m pretrain.demo`` with its default settings and seed.

Pretraining lowers the loss, keeps the teacher's assignments away from the uniform collapse, and SlotCon's
unsupervised segmentation of held-out toy scenes beats the same network at random initialisation by at
least 10 mIoU points. A broken loss, alignment or teacher update shows up here first (with the paper's LR at
this scale the pretrained mIoU fell below random init; with tau_t 0.07 the assignments went uniform, entropy
ln K, while the mIoU still looked fine).

Downstream, the converted teacher beats the run's own random initialisation, with the same schedule and
seed, in Mask R-CNN box AP and FCN mIoU, fine-tuned and with the backbone frozen. Measured (README): with the
45-epoch schedule every margin of seeds 0 and 2 is at least 2.7 points; with the former 30 epochs seed 2's
fine-tuned Mask R-CNN led by only +1.3 AP^b (two of its six prototypes had died). The test asks for 2 points:
the run it makes is bit-identical to a measured one only on the same kind of CPU with the same thread count
(pretraining's float32 reductions depend on both), and a fine-tune from slightly different weights moves a
margin by a point or so (a paired bootstrap over the 64 validation scenes puts the box-AP margin's standard
error at 0.7), which a 3-point bar would turn into a flaky test. A lost encoder variant (the stem max-pool the
demo encoder does not have) or a BN problem in conversion shows up here: before the converters carried the
variant, the pretrained FCN lost to random init by 5.5 points.

Slow: it is ``make demo`` (see BENCHMARKS.md for its stages' wall times); the README lists the numbers of
the seeds measured.
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
def test_demo_pretraining_and_transfer_beat_random_init(tmp_path: Path) -> None:
    out, data = tmp_path / "demo", tmp_path / "toy"
    proc = subprocess.run([sys.executable, "-m", "pretrain.demo", "--out", str(out), "--data", str(data)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    pre, rnd = s["unsup_miou_pretrained"], s["unsup_miou_random"]
    assert pre >= rnd + 10.0, f"unsupervised mIoU {pre:.1f} vs random init {rnd:.1f}: less than 10 points apart"
    for mode in ("full", "frozen"):
        for key in (f"det_{mode}_{{}}_AP_b", f"seg_{mode}_{{}}_mIoU"):
            p, r = s[key.format("pretrained")], s[key.format("random")]
            assert p >= r + 2.0, f"{key.format('pretrained|random')}: {p:.1f} vs {r:.1f}, less than 2 points apart"
    # Every prototype in use at the end: with 30 epochs two of seed 2's six died at epoch 10 and never came back
    # (only background and circles found); the 45-epoch schedule revives them (seeds 0 and 2: none dead from epoch 25).
    assert s["online_eval_last"]["dead_prototypes"] == 0, s["online_eval_last"]
    # The training loss fell over the run (first vs last 10 steps).
    run = Path(s["artefacts"]["run_dir"])
    from pretrain.engine.hooks import metrics_rows

    rows = metrics_rows(run / "metrics.jsonl", "train")  # the step rows; the online evaluation's are apart
    first = sum(r["loss"] for r in rows[:10]) / 10
    last = sum(r["loss"] for r in rows[-10:]) / 10
    assert last < first - 0.15, (first, last)
    # The teacher's assignments did not collapse to uniform (entropy ln K: every pixel equally on every
    # prototype, which centering alone allows; the demo's former tau_t 0.07 ended there at 1.77 of 1.79).
    from omegaconf import OmegaConf

    k = int(OmegaConf.load(run / "config.yaml").model.num_prototypes)
    entropy = sum(r["entropy"] for r in rows[-10:]) / 10
    assert entropy < 0.8 * math.log(k), f"teacher assignment entropy {entropy:.2f} is near uniform (ln K = {math.log(k):.2f})"
