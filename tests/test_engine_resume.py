"""Exact resume of ``python -m pretrain`` after SIGTERM (graceful) and SIGKILL (hard) mid-run.

The interrupted-and-resumed run must log the same per-step losses as an uninterrupted run
(CPU, deterministic, single-threaded, num_workers 0).
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from pretrain.config import load_config
from pretrain.engine import checkpoint as ck
from pretrain.train import run
from tests._engine_common import launch, make_toy, read_metrics, tiny_overrides

pytestmark = pytest.mark.slow
EPOCHS = 3  # 12 steps: a wide window to interrupt in
TERMS = ("loss", "loss_group", "loss_slot", "active_slots", "entropy", "lr", "teacher_momentum")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("ref")
    res = run(load_config(None, tiny_overrides(toy, d, **{"train.epochs": EPOCHS})))
    return {r["step"]: r for r in res.history}


def _wait(cond, proc, timeout=300.0):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before it could be interrupted:\n{proc.stdout.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail("timed out waiting for the run to progress")
        time.sleep(0.02)


def _assert_same(run_dir, reference):
    got = read_metrics(run_dir)
    assert sorted(got) == sorted(reference) == list(range(4 * EPOCHS))
    for step, want in reference.items():
        for k in TERMS:
            assert got[step][k] == pytest.approx(want[k], rel=1e-6, abs=1e-7), (step, k)


def test_sigterm_mid_run_then_resume(toy, tmp_path, reference):
    # One loader worker, and the signal sent to the whole process group as SLURM does: the
    # workers inherit the stop handler instead of dying, so the main process can still save.
    # (The reference ran with num_workers 0: augmentation depends only on (seed, epoch, index).)
    overrides = tiny_overrides(toy, tmp_path, **{"train.epochs": EPOCHS, "train.checkpoint_every_steps": 0,
                                                 "data.num_workers": 1})
    p = launch(overrides)
    _wait(lambda: len(read_metrics(tmp_path)) >= 2, p)
    os.killpg(p.pid, signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 75, out
    assert "stop requested (SIGTERM)" in out
    stopped = ck.find_latest(tmp_path / "checkpoints")[1]
    assert 2 <= stopped["step"] < 4 * EPOCHS
    assert max(read_metrics(tmp_path)) == stopped["step"] - 1  # finished the step it was in, then stopped
    p = launch(overrides)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    assert f"resumed from {ck.checkpoint_path(tmp_path / 'checkpoints', stopped['step'])}" in out
    _assert_same(tmp_path, reference)


def test_sigkill_after_checkpoint_then_resume(toy, tmp_path, reference):
    overrides = tiny_overrides(toy, tmp_path, **{"train.epochs": EPOCHS, "train.checkpoint_every_steps": 3})
    p = launch(overrides)
    _wait(lambda: ck.checkpoint_path(tmp_path / "checkpoints", 3).exists(), p)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    newest = ck.find_latest(tmp_path / "checkpoints")[1]["step"]
    assert newest < 4 * EPOCHS
    p = launch(overrides)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    assert "resumed from" in out
    _assert_same(tmp_path, reference)
