"""Nothing lost, nothing hung: pruning and resume keep to the run's usable checkpoints, checkpoints that do
not fit are skipped (or refused when named), stale temporary files go, a full disk is named, the run dir is
locked, a resume may not silently change the trajectory, and a blow-up never leaves its weights to resume."""
from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
import torch

from pretrain.config import load_config, to_dict
from pretrain.engine import checkpoint as ck
from pretrain.engine import rundir
from pretrain.engine.hooks import HookBase
from pretrain.train import main, run
from tests._engine_common import PY, REPO, child_env, launch, make_toy, read_metrics, tiny_overrides


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    torch.set_num_threads(1)
    return make_toy(tmp_path_factory.mktemp("toy"))


def _state(step: int, run_id: str | None = "A") -> dict:
    state = {"model": {"w": torch.full((2, 3), float(step))}, "optimizer": {"state": {}, "param_groups": []},
             "scaler": {}, "step": step, "epoch": 0, "step_in_epoch": step, "config": {}}
    if run_id is not None:
        state["run_id"] = run_id
    return state


def _steps(d) -> list[int]:
    return [ck.step_of(p) for p in ck.list_checkpoints(d)]


def _log(run_dir) -> str:
    return (run_dir / "log.txt").read_text()


# 1. pruning ------------------------------------------------------------------------------------------------

def test_prune_never_deletes_the_newest_usable_checkpoint_of_the_run(tmp_path, caplog):
    for s in (2, 4):
        ck.save_checkpoint(tmp_path, _state(s), keep_last=1)
    good = ck.checkpoint_path(tmp_path, 4).read_bytes()
    ck.checkpoint_path(tmp_path, 10).write_bytes(good[: len(good) // 2])  # a truncated copy
    torch.save(_state(8, run_id="B"), ck.checkpoint_path(tmp_path, 8))  # another run's file dropped in
    torch.save(_state(9, run_id=None), ck.checkpoint_path(tmp_path, 9))  # written before run ids existed
    ck.save_checkpoint(tmp_path, _state(6), keep_last=1)
    # ours: only the newest survives; the others are never deleted and never count
    assert _steps(tmp_path) == [10, 9, 8, 6]
    # the legacy file (no run id) is accepted for resuming; the truncated one is skipped
    assert ck.find_latest(tmp_path, run_id="A")[0].name == "ckpt_00000009.pth"
    (tmp_path / "ckpt_00000009.pth").unlink()
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        path, state = ck.find_latest(tmp_path, run_id="A")
    assert state["step"] == 6  # the foreign one is skipped too
    assert "ckpt_00000010.pth" in caplog.text
    assert f"skipping checkpoint {ck.checkpoint_path(tmp_path, 8)}: it belongs to another run (run id B" in caplog.text
    assert ck.find_latest(tmp_path, run_id=None)[1]["step"] == 8  # no run id given: any that loads


def test_resume_none_on_an_older_run_moves_it_aside_instead_of_interleaving(toy, tmp_path):
    old = run(load_config(None, tiny_overrides(toy, tmp_path, **{"train.max_steps": 4})))
    assert old.step == 4 and _steps(tmp_path / "checkpoints") == [4, 2]
    old_id = ck.read_run_id(tmp_path)
    new_cfg = load_config(None, tiny_overrides(toy, tmp_path, **{"train.max_steps": 2, "train.keep_last": 1,
                                                                 "train.resume": "none"}))
    new = run(new_cfg)
    assert new.step == 2 and [r["step"] for r in new.history] == [0, 1]
    new_id = ck.read_run_id(tmp_path)
    assert new_id and new_id != old_id
    # the new run's checkpoint is there, nothing of the old run is mixed in, and nothing was deleted
    assert _steps(tmp_path / "checkpoints") == [2]
    assert ck.load_checkpoint(ck.checkpoint_path(tmp_path / "checkpoints", 2))["run_id"] == new_id
    aside = list((tmp_path / rundir.SUPERSEDED).iterdir())
    assert len(aside) == 1 and aside[0].name.startswith(old_id)
    assert _steps(aside[0] / "checkpoints") == [4, 2]
    assert sorted(read_metrics(aside[0])) == [0, 1, 2, 3] and sorted(read_metrics(tmp_path)) == [0, 1]
    # and the default (resume=auto) continues the new run, not the old one
    again = run(load_config(None, tiny_overrides(toy, tmp_path, **{"train.max_steps": 3, "train.keep_last": 1})))
    assert [r["step"] for r in again.history] == [2]
    assert f"resumed from {ck.checkpoint_path(tmp_path / 'checkpoints', 2)}" in _log(tmp_path)


# 2. checkpoints that load but do not fit ------------------------------------------------------------------

def test_checkpoint_that_does_not_fit_is_skipped_or_refused_when_named(toy, tmp_path, capsys):
    first = run(load_config(None, tiny_overrides(toy, tmp_path, **{"train.max_steps": 2})))
    d = tmp_path / "checkpoints"
    assert first.step == 2
    state = ck.load_checkpoint(ck.checkpoint_path(d, 2))
    no_teacher = dict(state, step=3, model={k: v for k, v in state["model"].items() if not k.startswith("teacher_")})
    torch.save(no_teacher, ck.checkpoint_path(d, 3))
    other_arch = dict(state, step=5, model=dict(state["model"], **{"prototypes.weight": torch.zeros(16, 32)}))
    torch.save(other_arch, ck.checkpoint_path(d, 5))

    res = run(load_config(None, tiny_overrides(toy, tmp_path, **{"train.max_steps": 3})))
    assert [r["step"] for r in res.history] == [2]  # resumed from step 2, the newest that fits
    text = _log(tmp_path)
    assert f"skipping checkpoint {ck.checkpoint_path(d, 5)}: it does not fit this run" in text
    assert "shape mismatch(es) (checkpoint vs this run: prototypes.weight (16, 32) vs (8, 32))" in text
    assert f"skipping checkpoint {ck.checkpoint_path(d, 3)}: it does not fit this run" in text
    assert "model key(s) missing (teacher_" in text

    # named explicitly: refused with exit 64 and the reason, nothing trained
    named = ck.checkpoint_path(d, 5)
    rc = main(tiny_overrides(toy, tmp_path, **{"train.max_steps": 8, "train.resume": str(named)}))
    assert rc == 64
    assert f"train.resume={named} does not fit this run's model/optimiser" in _log(tmp_path)
    assert "prototypes.weight (16, 32) vs (8, 32)" in _log(tmp_path)
    rc = main(tiny_overrides(toy, tmp_path, **{"train.resume": str(tmp_path / "missing.pth")}))
    assert rc == 64 and "no such checkpoint file" in _log(tmp_path)


def test_fit_problems_names_optimizer_mismatch():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    other = torch.optim.SGD([model.weight], lr=0.1)
    state = {"model": model.state_dict(), "optimizer": other.state_dict()}
    assert "parameter groups hold [1] tensors, this run's [2]" in ck.fit_problems(state, model, opt)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    good = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    assert ck.fit_problems(good, model, opt) is None
    bad = {"model": dict(good["model"], weight=torch.full((2, 3), float("nan"))), "optimizer": good["optimizer"]}
    assert ck.fit_problems(bad, model, opt) == "'model.weight' holds NaN/Inf"


# 3. temporary files of interrupted writes -----------------------------------------------------------------

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_files_are_removed_safely(toy, tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    dead, alive = _dead_pid(), os.getppid()  # the parent (pytest's launcher or a shell) outlives this test
    stale = d / f".ckpt_00000004.pth.tmp.{dead}"
    live = d / f".ckpt_00000006.pth.tmp.{alive}"
    others = [d / f".ckpt_00000004.pth.tmp.{dead}x", d / "notes.tmp.123", d / f".ckpt_4.tmp.{dead}"]
    for p in (stale, live, *others):
        p.write_bytes(b"partial")
    assert ck.clean_temp_files(d) == [stale]  # only a dead writer's
    assert live.exists() and all(p.exists() for p in others)
    stale.write_bytes(b"partial")
    backbone_tmp = tmp_path / f".teacher_backbone.pth.tmp.{alive}"
    backbone_tmp.write_bytes(b"partial")
    # a run holding the lock knows nobody else writes there: every temporary file goes, nothing else
    run(load_config(None, tiny_overrides(toy, tmp_path, **{"train.max_steps": 1, "train.checkpoint_every_steps": 0})))
    assert not stale.exists() and not live.exists() and not backbone_tmp.exists()
    assert all(p.exists() for p in others)
    assert f"removed 2 temporary file(s) of interrupted writes in {d}" in _log(tmp_path)


# 4. a full disk ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("failure", ["enospc", "torch"])
def test_full_disk_is_named_and_leaves_older_checkpoints_intact(tmp_path, monkeypatch, failure):
    ck.save_checkpoint(tmp_path, _state(2), keep_last=3)
    real_save = torch.save

    def full(obj, f, *a, **k):
        f.write(b"x" * 1000)  # some bytes made it before the disk filled up
        if failure == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ck.CheckpointWriteError) as e:
        ck.save_checkpoint(tmp_path, _state(4), keep_last=3)
    monkeypatch.setattr(torch, "save", real_save)
    msg = str(e.value)
    assert str(ck.checkpoint_path(tmp_path, 4)) in msg and "bytes free on the file system of" in msg
    assert "older files in" in msg and "are intact" in msg
    if failure == "enospc":
        assert "the disk is full" in msg and e.value.errno == errno.ENOSPC
    else:
        assert "PytorchStreamWriter failed" in msg
    assert os.listdir(tmp_path) == ["ckpt_00000002.pth"]  # no temporary file, the older checkpoint stays
    assert ck.load_checkpoint(ck.checkpoint_path(tmp_path, 2))["step"] == 2


def test_full_disk_during_training_exits_74(toy, tmp_path, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def second_fails(obj, f, *a, **k):
        if isinstance(obj, dict) and "optimizer" in obj:
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", second_fails)
    rc = main(tiny_overrides(toy, tmp_path))
    assert rc == 74
    assert "the disk is full" in _log(tmp_path)
    assert _steps(tmp_path / "checkpoints") == [2] and not [p for p in os.listdir(tmp_path / "checkpoints")
                                                            if ".tmp." in p]


# 5. Ctrl-C ---------------------------------------------------------------------------------------------------

def _wait_for(cond, proc, what: str, timeout: float = 900.0) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before {what}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.slow
def test_ctrl_c_checkpoints_at_that_step_and_exits_75(toy, tmp_path):
    overrides = tiny_overrides(toy, tmp_path, **{"train.epochs": 3, "train.checkpoint_every_steps": 0})
    p = launch(overrides)
    _wait_for(lambda: len(read_metrics(tmp_path)) >= 2, p, "two steps")
    os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground process group
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 75, out
    assert "stop requested (SIGINT)" in out and "press Ctrl-C again" in out
    stopped = ck.find_latest(tmp_path / "checkpoints")[1]
    assert stopped["step"] == max(read_metrics(tmp_path)) + 1  # the step it was in, finished and saved
    assert 2 <= stopped["step"] < 12


TWICE = """
import sys, time
import pretrain.train as t
from pretrain.engine.hooks import HookBase
from pretrain.engine.signals import stop_requested

class SlowToStop(HookBase):
    def after_step(self):
        if stop_requested():
            time.sleep(60)  # a step (or a write) that takes long: a second Ctrl-C must not wait for it

run = t.run
t.run = lambda cfg: run(cfg, [SlowToStop()])
sys.exit(t.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once(toy, tmp_path):
    overrides = tiny_overrides(toy, tmp_path, **{"train.epochs": 3, "train.checkpoint_every_steps": 0})
    p = subprocess.Popen([PY, "-c", TWICE, *overrides], cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []

    def read() -> None:
        for line in p.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    _wait_for(lambda: len(read_metrics(tmp_path)) >= 1, p, "a step")
    os.killpg(p.pid, signal.SIGINT)
    _wait_for(lambda: any("press Ctrl-C again" in x for x in lines), p, "the first Ctrl-C to be seen")
    os.killpg(p.pid, signal.SIGINT)
    try:
        rc = p.wait(timeout=40)  # well before the 60 s the stop would take
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("a second Ctrl-C did not stop the run")
    reader.join(timeout=10)
    out = "".join(lines)
    assert rc == 130, out
    assert "interrupted by a second Ctrl-C" in out and "Traceback" not in out


# 6. the run directory's lock and config changes on resume ---------------------------------------------------

HOLD = """
import os, sys, time
from pretrain.engine.rundir import RunDirLock
RunDirLock(sys.argv[1]).acquire()
child = os.fork()
if child == 0:  # like a data-loader worker: forked while the lock is held, outlives its parent
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def test_second_run_on_a_locked_run_dir_is_refused_and_a_dead_holder_does_not_block(toy, tmp_path, capsys):
    tmp_path.mkdir(exist_ok=True)
    holder = subprocess.Popen([PY, "-c", HOLD, str(tmp_path)], cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                              text=True)
    grandchild = int(holder.stdout.readline())
    try:
        rc = main(tiny_overrides(toy, tmp_path, **{"train.max_steps": 1}))
        err = capsys.readouterr().err
        assert rc == 73
        assert f"run directory {tmp_path} is in use by another run: host {socket.gethostname()}, pid {holder.pid}" in err
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
        holder.kill()  # kill -9: the kernel drops the lock; the forked child closed its copy at fork
        holder.wait()
        os.kill(grandchild, 0)  # still alive
        assert main(tiny_overrides(toy, tmp_path, **{"train.max_steps": 1})) == 0
    finally:
        holder.kill()
        try:
            os.kill(grandchild, 9)
        except ProcessLookupError:
            pass


def test_resume_refuses_a_trajectory_change_unless_allowed(toy, tmp_path):
    base = {"train.max_steps": 2}
    assert main(tiny_overrides(toy, tmp_path, **base)) == 0
    config_before = (tmp_path / "config.yaml").read_text()
    changed = {**base, "train.max_steps": 3, "optim.base_lr": 2.0, "train.epochs": 3}
    assert main(tiny_overrides(toy, tmp_path, **changed)) == 64
    text = _log(tmp_path)
    assert "the config changes the run's trajectory: optim.base_lr 1.0 -> 2.0, train.epochs 2 -> 3" in text
    assert "train.allow_config_change=[optim.base_lr,train.epochs]" in text
    assert (tmp_path / "config.yaml").read_text() == config_before  # the refused config did not replace it
    assert sorted(read_metrics(tmp_path)) == [0, 1]
    # allowed for one key, the other still refused
    assert main(tiny_overrides(toy, tmp_path, **changed, **{"train.allow_config_change": "[optim.base_lr]"})) == 64
    # settings that do not change the trajectory may change freely, the listed keys when allowed
    ok = {**changed, "train.allow_config_change": "[optim.base_lr,train]", "log.every_steps": 5,
          "train.checkpoint_every_steps": 1, "data.num_workers": 1, "train.keep_last": 2}
    assert main(tiny_overrides(toy, tmp_path, **ok)) == 0
    assert sorted(read_metrics(tmp_path)) == [0, 1, 2]
    assert "with changed config (train.allow_config_change): optim.base_lr 1.0 -> 2.0, train.epochs 2 -> 3" in _log(
        tmp_path)


def test_config_changes_rules():
    from pretrain.config import PretrainConfig

    defaults = to_dict(PretrainConfig())
    old = to_dict(load_config(None, ["optim.base_lr=1.0"]))
    new = to_dict(load_config(None, ["optim.base_lr=0.5", "model.num_prototypes=16", "log.every_steps=3",
                                     "train.device=cpu", "data.num_workers=7", "data.image_size=96"]))
    c = rundir.config_changes(old, new, defaults=defaults)
    assert [k for k, _, _ in c.refused] == ["data.image_size", "model.num_prototypes", "optim.base_lr"]
    assert sorted(k for k, _, _ in c.free) == ["data.num_workers", "log.every_steps", "train.device"]
    c = rundir.config_changes(old, new, ["model", "optim.base_lr"], defaults)
    assert [k for k, _, _ in c.refused] == ["data.image_size"]
    # a key the old config lacks counts as its default
    del old["train"]["allow_config_change"], old["optim"]["clip_grad"]
    assert rundir.config_changes(old, to_dict(load_config(None, ["optim.base_lr=1.0"])), defaults=defaults).refused == []
    clip = to_dict(load_config(None, ["optim.base_lr=1.0", "optim.clip_grad=1.0"]))
    assert rundir.config_changes(old, clip, defaults=defaults).refused == [("optim.clip_grad", 0.0, 1.0)]
    with pytest.raises(Exception, match="train.allow_config_change"):
        load_config(None, ["train.allow_config_change=[nosuchsection.x]"])


# 7. a blow-up never leaves its weights to resume from --------------------------------------------------------

class BlowUpAfter(HookBase):
    """After step ``step``'s update, every trainable weight times ``factor`` (or one weight set to inf):
    what a huge learning rate does to an update whose loss was still finite."""

    def __init__(self, step: int, factor: float = 1e30, inf: bool = False) -> None:
        self.step, self.factor, self.inf = step, factor, inf

    def after_step(self) -> None:
        t = self.trainer
        if t.step - 1 != self.step:
            return
        with torch.no_grad():
            if self.inf:
                t.method.projector.mlp[0].weight.view(-1)[0] = float("inf")
                return
            for p in t.method.parameters():
                if p.requires_grad:
                    p.mul_(self.factor)


def test_blow_up_quarantines_the_checkpoints_after_it_and_the_rerun_succeeds(toy, tmp_path, monkeypatch):
    overrides = tiny_overrides(toy, tmp_path, **{"train.keep_last": 1})
    monkeypatch.setattr("pretrain.train.run", lambda cfg: run(cfg, [BlowUpAfter(3)]))
    assert main(overrides) == 65
    monkeypatch.undo()
    d = tmp_path / "checkpoints"
    # step 3's loss was finite and its blown-up weights (finite, ~1e29) were checkpointed as step 4;
    # step 4's loss was not: checkpoint 4 is quarantined, not deleted, and step 2's is kept despite keep_last=1
    assert _steps(d) == [2]
    assert (d / ck.QUARANTINE / "ckpt_00000004.pth").is_file()
    assert ck.load_checkpoint(d / ck.QUARANTINE / "ckpt_00000004.pth")["model"]["encoder.conv1.weight"].abs().max() > 1e20
    text = _log(tmp_path)
    assert "non-finite loss at step 4" in text
    assert f"a rerun resumes from {ck.checkpoint_path(d, 2)} (step 2)" in text
    before = read_metrics(tmp_path)
    assert main(overrides) == 0  # normal LR, no hook: resumes before the blow-up and finishes
    assert f"resumed from {ck.checkpoint_path(d, 2)}" in _log(tmp_path)
    after = read_metrics(tmp_path)
    assert sorted(after) == list(range(8))
    for step in (2, 3):  # the redone steps are the same as before the blow-up
        assert after[step]["loss"] == pytest.approx(before[step]["loss"], rel=1e-6, abs=1e-7)


def test_non_finite_weights_are_never_checkpointed(toy, tmp_path, monkeypatch):
    monkeypatch.setattr("pretrain.train.run", lambda cfg: run(cfg, [BlowUpAfter(3, inf=True)]))
    assert main(tiny_overrides(toy, tmp_path)) == 65
    d = tmp_path / "checkpoints"
    assert _steps(d) == [2] and not (d / ck.QUARANTINE).exists()  # step 4's checkpoint was refused
    text = _log(tmp_path)
    assert "non-finite weights after step 3: 'model.projector.mlp.0.weight' holds NaN/Inf; checkpoint of step 4 " \
           "not written" in text
    assert f"a rerun resumes from {ck.checkpoint_path(d, 2)} (step 2)" in text
    for p in ck.list_checkpoints(d):
        assert ck.first_non_finite(ck.load_checkpoint(p)) is None


def test_save_checkpoint_refuses_non_finite_optimizer_state(tmp_path):
    state = _state(3)
    state["optimizer"] = {"state": {0: {"momentum_buffer": torch.tensor([1.0, float("inf")])}}, "param_groups": []}
    with pytest.raises(ck.NonFiniteStateError, match="'optimizer.state.0.momentum_buffer' holds NaN/Inf"):
        ck.save_checkpoint(tmp_path, state, keep_last=1)
    assert os.listdir(tmp_path) == []


def test_quarantine_moves_only_this_runs_checkpoints(tmp_path):
    for s in (2, 4, 6):
        ck.save_checkpoint(tmp_path, _state(s), keep_last=5)
    torch.save(_state(8, run_id="B"), ck.checkpoint_path(tmp_path, 8))
    moved = ck.quarantine(tmp_path, 4, run_id="A")
    assert sorted(p.name for p in moved) == ["ckpt_00000004.pth", "ckpt_00000006.pth"]
    assert _steps(tmp_path) == [8, 2]
    ck.save_checkpoint(tmp_path, _state(4), keep_last=5)
    assert [p.name for p in ck.quarantine(tmp_path, 3, run_id="A")] == ["ckpt_00000004.pth.1"]  # both kept


def test_run_id_is_recorded_and_adopted(tmp_path):
    d = tmp_path / "checkpoints"
    rid = rundir.prepare_run_dir(tmp_path, "auto", exclusive=True)
    assert ck.read_run_id(tmp_path) == rid and len(rid) == 16
    assert rundir.prepare_run_dir(tmp_path, "auto", exclusive=True) == rid
    (tmp_path / ck.RUN_ID_FILE).unlink()
    other = uuid.uuid4().hex[:16]
    ck.save_checkpoint(d, _state(2, run_id=other), keep_last=1)
    assert rundir.prepare_run_dir(tmp_path, "auto", exclusive=True) == other  # a copied run dir keeps its id
