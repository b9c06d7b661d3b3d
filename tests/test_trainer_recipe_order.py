"""The training step follows the recipe's order: LR and teacher EMA (with the step's momentum) before the
step's forward pass, the optimiser step after it; hooks see each step once, in order."""
from __future__ import annotations

import pytest
import torch

from pretrain.config import load_config
from pretrain.engine.hooks import HookBase
from pretrain.engine.schedules import momentum_at
from pretrain.train import run
from tests._engine_common import make_toy, tiny_overrides


class RecordOrder(HookBase):
    """Wraps the method's EMA update, forward pass and the optimiser step to log the order of the calls."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def before_train(self) -> None:
        t = self.trainer
        update, forward, opt_step = t.method.update_teacher, t.method.forward, t.optimizer.step

        def ema(momentum: float) -> None:
            # the teacher's weights just before the update: the EMA must act on the previous step's student
            self.events.append(("ema", t.step, momentum))
            update(momentum)

        def fwd(*a, **k):
            teacher = next(t.method.teacher_encoder.parameters()).detach().clone()
            self.events.append(("forward", t.step, teacher))
            return forward(*a, **k)

        def step(*a, **k):
            self.events.append(("optimizer", t.step, t.optimizer.param_groups[0]["lr"]))
            return opt_step(*a, **k)

        t.method.update_teacher, t.method.forward, t.optimizer.step = ema, fwd, step

    def before_step(self) -> None:
        self.events.append(("before_step", self.trainer.step))

    def after_step(self) -> None:
        self.events.append(("after_step", self.trainer.step - 1))


def test_ema_update_precedes_the_forward_pass_of_the_same_step(tmp_path):
    torch.set_num_threads(1)
    toy = make_toy(tmp_path / "toy")
    cfg = load_config(None, tiny_overrides(toy, tmp_path / "run", **{"train.max_steps": 3,
                                                                     "train.checkpoint_every_steps": 0}))
    rec = RecordOrder()
    res = run(cfg, [rec])
    kinds = [(e[0], e[1]) for e in rec.events]
    expected = []
    for k in range(3):
        expected += [("before_step", k), ("ema", k), ("forward", k), ("optimizer", k), ("after_step", k)]
    assert kinds == expected
    total = cfg.train.epochs * 4  # 32 toy images / batch 8
    for e in rec.events:
        if e[0] == "ema":
            assert e[2] == pytest.approx(momentum_at(e[1], total, cfg.model.teacher_momentum), rel=1e-12)
        if e[0] == "optimizer":
            assert e[2] == pytest.approx(res.history[e[1]]["lr"], rel=1e-12)
    # the teacher seen by step k's forward pass differs from step k-1's: the EMA ran in between
    teachers = [e[2] for e in rec.events if e[0] == "forward"]
    assert not torch.equal(teachers[1], teachers[2])
