"""Shared tiny settings for the engine tests (ResNet-18, 64 px, small heads, toy scenes)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def tiny_overrides(toy_root: Path, run_dir: Path, **extra) -> list[str]:
    """Overrides of the default config: 4 steps/epoch of 8 images at 64 px, deterministic, CPU."""
    base = {
        "name": "t", "data.dataset": "toy", "data.root": str(toy_root), "data.loader": "pil",
        "data.image_size": 64, "data.num_workers": 0, "model.arch": "resnet18", "model.dim_hidden": 64,
        "model.dim_out": 32, "model.num_prototypes": 8, "optim.batch_size": 8, "optim.warmup_epochs": 1,
        "train.epochs": 2, "train.amp": "none", "train.channels_last": False, "train.device": "cpu",
        "train.deterministic": True, "train.run_dir": str(run_dir), "train.checkpoint_every_steps": 2,
        "train.keep_last": 10, "log.every_steps": 1, "log.image_every_steps": 0, "log.progress_bar": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def make_toy(root: Path) -> Path:
    from pretrain.data.toy_scenes import make_toy_scenes

    return make_toy_scenes(root, n_train=32, n_val=4, size=64, seed=0)


def child_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    return env


def launch(overrides: list[str]) -> subprocess.Popen:
    """``python -m pretrain`` in a subprocess, in its own session so that ``os.killpg`` reaches it and
    its data-loader workers together (as SLURM signals every process of a job step)."""
    return subprocess.Popen([PY, "-m", "pretrain", *overrides], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """Per-step training metrics; the last row wins where a killed run logged steps that were later redone.
    The online evaluation's rows (``"kind": "eval"``) are left out: :func:`read_eval_rows` has them."""
    from pretrain.engine.hooks import metrics_rows

    return {r["step"]: r for r in metrics_rows(run_dir / "metrics.jsonl", "train")}


def read_eval_rows(run_dir: Path) -> dict[int, dict]:
    """The online evaluation's rows by ``epoch`` (epochs completed); the last row of an epoch wins."""
    from pretrain.eval.curves import eval_curve

    return eval_curve(run_dir)
