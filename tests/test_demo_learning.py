"""The CPU demo's learning and transfer signal: ``python -m pretrain.demo`` with its default settings and seed.

Pretraining lowers the loss, keeps the teacher's assignments away from the uniform collapse, and SlotCon's
unsupervised segmentation of held-out toy scenes beats the same network at random initialisation by at
least 10 mIoU points. A broken loss, alignment or teacher update shows up here first (with the paper's LR and
LARS trust coefficient at this scale the pretrained mIoU fell below random init; with tau_t 0.07 the assignments
went uniform, entropy ln K, while the mIoU still looked fine).

Downstream, the converted teacher beats the run's own random initialisation, with the same schedule and
seed, by the margins in :data:`MIN_MARGIN` (README, "What the demo measures", has them at seeds 0-2): three
points, the bar the demo is built for, in FCN mIoU (fine-tuned and frozen) and frozen Mask R-CNN box AP. The
fine-tuned Mask R-CNN's box AP is asked for 2 points: measured +2.2, +3.7, +4.8 at seeds 0, 1, 2.
The detection bars hold at seed 0 because this run is bit-identical to the measured one on the same CPU and
thread count, not because they are robust: the same seed-0 weights fine-tuned with Detectron2 seeds 0-4 gave
box-AP margins of +2.9, +2.1, -0.1, +0.9, +0.9 (fine-tuned) and +3.2, +2.6, +0.3, +2.7, +1.4 (frozen) on 256
validation scenes (README, "How much of a margin is the fine-tune's chance"). On another CPU kind, whose
rounding gives other weights, a detection row can fail by chance; the FCN rows are the robust ones (fine-tuned
+2.9 to +6.8 over four fine-tune seeds, frozen +12.0 to +16.5).
Before the demo's pretraining used LARS eta 0.1 (base LR 8, eta 0.001: convolutions within 10 % of their
initialisation) the fine-tuned FCN lost to random init (53.3 vs 55.7 at seed 0): that is the failure the FCN
rows catch; before the converters carried the encoder variant (the stem max-pool the demo encoder does not
have) the FCN lost by 5.5 points.

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

#: Pretrained minus random init, in points, that the default demo must show (summary.json keys).
MIN_MARGIN = {
    "seg_full_{}_mIoU": 3.0,
    "seg_frozen_{}_mIoU": 3.0,
    "det_frozen_{}_AP_b": 3.0,
    "det_full_{}_AP_b": 2.0,
}


@pytest.mark.slow
def test_demo_pretraining_and_transfer_beat_random_init(tmp_path: Path) -> None:
    out, data = tmp_path / "demo", tmp_path / "toy"
    proc = subprocess.run([sys.executable, "-m", "pretrain.demo", "--out", str(out), "--data", str(data)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    pre, rnd = s["unsup_miou_pretrained"], s["unsup_miou_random"]
    assert pre >= rnd + 10.0, f"unsupervised mIoU {pre:.1f} vs random init {rnd:.1f}: less than 10 points apart"
    for key, margin in MIN_MARGIN.items():
        p, r = s[key.format("pretrained")], s[key.format("random")]
        name = key.format("pretrained|random")
        assert p >= r + margin, f"{name}: {p:.1f} vs {r:.1f}, less than {margin} points apart"
    # Every prototype in use at the end: with the former base LR 8 and 30 epochs two of seed 2's six died at
    # epoch 10 and never came back (only background and circles found).
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
