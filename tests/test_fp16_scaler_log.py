"""fp16's GradScaler is not silent: its scale and the skipped steps are logged, a stall warns once.

CUDA is where fp16 runs; the GradScaler's logic is device independent and ``torch.amp.GradScaler("cpu")``
runs it here through the real training loop. The forward stays float32 (CPU fp16 autocast is emulated and
takes seconds a step); the scaler is the one ``train.amp=fp16`` builds, forced on.
"""
from __future__ import annotations

import logging

import pytest
import torch

from pretrain.config import load_config
from pretrain.engine.hooks import HookBase
from pretrain.engine.precision import ScalerWatch
from pretrain.train import run
from tests._engine_common import make_toy, read_metrics, tiny_overrides


class InfGradsUntil(HookBase):
    """Every gradient of one projector weight is Inf during the first ``n`` steps (the scaler must skip them)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def before_train(self) -> None:
        w = next(self.trainer.method.projector.parameters())
        w.register_hook(lambda g: torch.full_like(g, float("inf")) if self.trainer.step < self.n else g)


def test_skipped_steps_scale_and_one_stall_warning(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: real(device, enabled=True))
    monkeypatch.setattr(ScalerWatch, "STALL_STEPS", 5)
    toy = make_toy(tmp_path / "toy")
    cfg = load_config(None, tiny_overrides(toy, tmp_path / "run", **{
        "train.amp": "none", "train.epochs": 3, "train.checkpoint_every_steps": 1000}))  # 12 steps
    res = run(cfg, [InfGradsUntil(8)])
    assert res.step == 12
    rows = read_metrics(tmp_path / "run")
    assert [rows[s]["amp_skipped_steps"] for s in (0, 4, 7, 8, 11)] == [1, 5, 8, 8, 8]
    assert rows[7]["amp_scale"] == 65536.0 / 2 ** 8 and rows[11]["amp_scale"] == rows[7]["amp_scale"]
    log_txt = (tmp_path / "run" / "log.txt").read_text()
    stalls = [ln for ln in log_txt.splitlines() if "consecutive optimizer steps skipped" in ln]
    assert len(stalls) == 1 and "5 consecutive" in stalls[0] and "up to step 4" in stalls[0]
    assert "skipped 8" in log_txt  # the periodic log line shows the count


def test_watch_counts_streaks_and_is_silent_without_the_scaler(caplog: pytest.LogCaptureFixture) -> None:
    class FakeScaler:
        def __init__(self) -> None:
            self.scale = 8.0

        def is_enabled(self) -> bool:
            return True

        def get_scale(self) -> float:
            return self.scale

    s = FakeScaler()
    w = ScalerWatch(s)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        for step in range(2 * ScalerWatch.STALL_STEPS + 5):
            s.scale /= 2 if step != ScalerWatch.STALL_STEPS + 2 else 1  # one good step splits two streaks
            w.after_update(step)
    assert w.skipped_total == 2 * ScalerWatch.STALL_STEPS + 4
    assert len([r for r in caplog.records if "consecutive" in r.getMessage()]) == 2
    assert ScalerWatch(torch.amp.GradScaler("cpu", enabled=False)).after_update(0) == {}
