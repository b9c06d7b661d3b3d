"""The training loop in one process on the toy scenes: run dir, logs, schedules, NaN stop, in-process resume."""
from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import load_config
from pretrain.engine import checkpoint as ck
import pretrain.train
from pretrain.engine.hooks import HookBase
from pretrain.engine.trainer import NonFiniteLossError
from pretrain.train import main, request_checkpoint_and_exit, run
from tests._engine_common import make_toy, tiny_overrides


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    torch.set_num_threads(1)
    return make_toy(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def full_run(toy, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    cfg = load_config(None, tiny_overrides(toy, run_dir, **{"log.image_every_steps": 4}))
    return cfg, run(cfg)


def test_run_dir_layout_and_checkpoint_contents(full_run):
    cfg, res = full_run
    assert res.status == "finished" and res.step == 8 and res.epoch == 2
    d = res.run_dir
    assert (d / "config.yaml").is_file() and load_config(d / "config.yaml") == cfg
    assert "epoch 1 done" in (d / "log.txt").read_text()
    assert "skipped bad images 0" in (d / "log.txt").read_text()
    assert list((d / "tb").glob("events.out.tfevents.*"))
    steps = [int(p.stem.split("_")[1]) for p in ck.list_checkpoints(d / "checkpoints")]
    assert steps == [8, 6, 4, 2]  # every 2 steps (4 and 8 are also the epoch ends)
    state = torch.load(d / "checkpoints" / "ckpt_00000008.pth", weights_only=True)
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (8, 2, 0)
    assert state["config"]["model"]["arch"] == "resnet18"
    assert "center" in state["model"]
    backbone = torch.load(d / "teacher_backbone.pth", weights_only=True)
    assert backbone["arch"] == "resnet18"
    for k, v in backbone["backbone"].items():
        torch.testing.assert_close(v, state["model"]["teacher_encoder." + k], rtol=0, atol=0)


def test_logged_schedules_follow_formulas_and_losses_finite(full_run):
    cfg, res = full_run
    K, W = 8, 4  # 2 epochs x 4 steps; 1 warm-up epoch
    peak = 1.0 * 8 / 256
    for row in res.history:
        k = row["step"]
        lr = peak / 100 + (peak - peak / 100) * k / W if k < W else \
            1e-6 + (peak - 1e-6) * 0.5 * (1 + math.cos(math.pi * (k - W) / (K - W)))
        assert row["lr"] == pytest.approx(lr, rel=1e-12)
        assert row["teacher_momentum"] == pytest.approx(1 - 0.01 * (math.cos(math.pi * k / K) + 1) / 2, rel=1e-12)
        assert math.isfinite(row["loss"]) and {"loss_group", "loss_slot"} <= set(row)
    assert [r["step"] for r in res.history] == list(range(8))


def test_tensorboard_has_every_term_and_pictures(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, res = full_run
    ea = EventAccumulator(str(res.run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for t in ("loss", "loss_group", "loss_slot", "lr", "teacher_momentum", "images_per_s", "time_data_s",
              "time_compute_s", "memory_mb"):
        assert f"train/{t}" in tags
    assert "epoch/skipped_images" in tags
    assert len(ea.Scalars("train/loss")) == 8
    assert [e.value for e in ea.Scalars("train/lr")] == pytest.approx([r["lr"] for r in res.history])
    assert [e.step for e in ea.Images("slots/view1_then_view2")] == [0, 4]


class PoisonAt(HookBase):
    """Makes step ``step``'s loss NaN: one weight of the student's projector becomes NaN before its forward pass."""

    def __init__(self, step: int) -> None:
        self.step = step

    def before_step(self) -> None:
        if self.trainer.step == self.step:
            with torch.no_grad():
                next(self.trainer.method.projector.parameters()).view(-1)[0] = float("nan")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(toy, tmp_path, monkeypatch):
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3"):
        run(load_config(None, tiny_overrides(toy, tmp_path / "direct")), [PoisonAt(3)])
    # the CLI maps it to exit 65 and logs it to the run's log.txt
    monkeypatch.setattr(pretrain.train, "run", lambda cfg: run(cfg, [PoisonAt(3)]))
    rc = main(tiny_overrides(toy, tmp_path))
    assert rc == 65
    assert "non-finite loss at step 3: 'loss'" in (tmp_path / "log.txt").read_text()
    ckpts = ck.list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in ckpts] == ["ckpt_00000002.pth"]  # nothing written at or after the bad step
    state = ck.load_checkpoint(ckpts[0])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


class StopAfterStep5(HookBase):
    def after_step(self) -> None:
        if self.trainer.step - 1 == 5:
            request_checkpoint_and_exit("test")


def test_stop_request_mid_epoch_then_resume_matches(toy, tmp_path, full_run):
    _, ref = full_run
    cfg = load_config(None, tiny_overrides(toy, tmp_path, **{"train.checkpoint_every_steps": 0}))
    res = run(cfg, [StopAfterStep5()])
    assert res.status == "preempted" and res.step == 6
    state = ck.load_checkpoint(ck.checkpoint_path(tmp_path / "checkpoints", 6))
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2)  # mid-epoch
    res2 = run(cfg)
    assert res2.status == "finished" and [r["step"] for r in res2.history] == [6, 7]
    for got, want in zip(res.history + res2.history, ref.history):
        for k in ("loss", "loss_group", "loss_slot", "lr", "teacher_momentum"):
            assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-7), (got["step"], k)
    res3 = run(cfg)  # a finished run restarted does no more steps
    assert res3.status == "finished" and res3.step == 8 and res3.history == []
