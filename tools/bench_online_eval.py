"""Benchmark: one online evaluation vs one epoch of pretraining, at the CPU demo's settings.

Runs ``configs/pretrain/demo_cpu.yaml`` (the demo's settings and toy scenes) for ``--epochs``
epochs with the online evaluation after each (``eval.every_epochs=1``), in one process, so epochs and
evaluations alternate on the same machine state. An epoch's time is the wall time from its start to the
next epoch's start minus its evaluation (so it includes its checkpoint and pictures, as in the demo); an
evaluation's is the ``seconds`` of its ``metrics.jsonl`` row. The table reports medians, the median ratio of
an evaluation to its own epoch, and the share of the demo's pretraining time its own schedule
(:data:`pretrain.demo.DEMO_EVAL`) costs at that ratio.

    python tools/bench_online_eval.py --out bench/online_eval.md
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "pretrain" / "demo_cpu.yaml"
sys.path.insert(0, str(ROOT))

from tools.bench_common import write_table  # noqa: E402


def _demo_schedule() -> tuple[int, bool]:
    """``(every_epochs, at_end)`` of the demo's online evaluation."""
    from pretrain.demo import DEMO_EVAL

    values = dict(x.split("=", 1) for x in DEMO_EVAL)
    return int(values["eval.every_epochs"]), values["eval.at_end"].lower() == "true"


def _demo_epochs() -> int:
    """``train.epochs`` of the demo's config: the schedule the evaluation's share is computed for."""
    from pretrain.config import load_config

    return load_config(DEMO_CONFIG).train.epochs


def measure(data: Path, epochs: int, run_dir: Path) -> tuple[list[float], list[float], dict]:
    """Train ``epochs`` epochs of the demo with an evaluation after each; ``(epoch s, eval s, info)``."""
    from pretrain.config import load_config
    from pretrain.engine.hooks import HookBase, metrics_rows
    from pretrain.train import run

    class EpochClock(HookBase):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def before_epoch(self) -> None:
            self.starts.append(time.perf_counter())

        def after_train(self) -> None:
            self.starts.append(time.perf_counter())

    # train.epochs shortens the schedule only: a step's work does not depend on its LR or momentum
    cfg = load_config(DEMO_CONFIG,
                      [f"data.root={data}", f"train.run_dir={run_dir}", f"train.epochs={epochs}", "eval.every_epochs=1",
                       "eval.at_end=false", "log.progress_bar=false", "train.export_backbone=false"])
    clock = EpochClock()
    res = run(cfg, [clock])
    steps_per_epoch = res.step // epochs
    evals = metrics_rows(run_dir / "metrics.jsonl", "eval")
    eval_s = [r["seconds"] for r in evals]
    spans = [b - a for a, b in zip(clock.starts, clock.starts[1:])]
    epoch_s = [span - ev for span, ev in zip(spans, eval_s)]
    from pretrain.engine.precision import resolve_amp

    info = {"steps": steps_per_epoch, "batch": cfg.optim.batch_size, "size": cfg.data.image_size,
            "images": evals[0]["num_images"], "arch": cfg.model.arch,
            "amp": f"{cfg.train.amp} -> {resolve_amp(cfg.train.amp, torch.device('cpu'))}"}
    return epoch_s, eval_s, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT / "data/toy_scenes", help="the demo's toy scenes (generated if absent)")
    p.add_argument("--epochs", type=int, default=3, help="epochs (and evaluations) to time")
    p.add_argument("--out", default="bench/online_eval.md")
    a = p.parse_args(argv)
    every, at_end = _demo_schedule()
    with tempfile.TemporaryDirectory() as tmp:
        epoch_s, eval_s, info = measure(a.data.resolve(), a.epochs, Path(tmp) / "run")
    ep, ev = statistics.median(epoch_s), statistics.median(eval_s)
    # each evaluation against its own epoch: the pairs share the machine's state (other load comes and goes)
    pair = statistics.median(e / t for e, t in zip(eval_s, epoch_s))
    total_epochs = _demo_epochs()
    n_evals = total_epochs // every + (1 if at_end and total_epochs % every else 0)
    share = n_evals * pair / total_epochs
    cmd = shlex.join(["python", "tools/bench_online_eval.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        "# Online evaluation vs one epoch of the CPU demo",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; torch "
        f"{torch.__version__}; {platform.platform()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
        f"`demo_cpu` ({info['arch']}, {info['steps']} steps of {info['batch']} images at {info['size']} px per epoch, "
        f"train.amp={info['amp']}); the evaluation scores the teacher on the {info['images']} held-out scenes at their "
        f"native size (mIoU, pAcc, FG-ARI, mBO, prototype health, one picture). Median of {a.epochs} epochs, each "
        "followed by its evaluation, in one run.",
        "",
        "| quantity | seconds | per epoch |",
        "|---|---|---|",
        f"| one epoch of pretraining (incl. its checkpoint and pictures) | {ep:.2f} | |",
        f"| one online evaluation | {ev:.2f} | {100 * pair:.1f}% (median of evaluation / its epoch) |",
        f"| the demo's schedule: every {every} epochs{' and at the end' if at_end else ''}, {n_evals} evaluations in "
        f"{total_epochs} epochs | | {100 * share:.2f}% of pretraining |",
        "",
        "All epochs (s): " + ", ".join(f"{x:.2f}" for x in epoch_s) + "; all evaluations (s): "
        + ", ".join(f"{x:.2f}" for x in eval_s) + ".",
    ]
    write_table(a.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
