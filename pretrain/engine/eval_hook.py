"""The online evaluation as a hook: the teacher scored on the held-out split at chosen epoch ends.

``eval.every_epochs`` = N evaluates after epochs N, 2N, ...; ``eval.at_end`` also after the schedule's
last epoch (once, if that is a multiple of N). The figures (:mod:`pretrain.eval.online`) land in

* ``metrics.jsonl``: one row ``{"kind": "eval", "epoch": E, "step": S, ...}`` where ``E`` is the number
  of epochs completed (the row of epoch 5 is the teacher after five full epochs) and ``S`` the number of
  optimiser steps done; ``null`` for a figure the split cannot give; strict JSON (no NaN/Inf);
* TensorBoard: ``eval/<figure>`` scalars and the ``eval/assignments`` picture, at step ``E``;
* the text log: one line.

It runs in ``after_epoch`` on every rank (each scores its shard; one all-reduce), after ``MetricsLog``
and before ``PeriodicCheckpoint``, so the epoch's eval row is on disk before the epoch's checkpoint. On a
stop request at an epoch end the evaluation is skipped (the grace period before SIGKILL is short) and
the log says so; the resumed run does not redo it.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from pretrain.engine.hooks import HookBase
from pretrain.engine.logging import TBWriter

log = logging.getLogger("pretrain")

#: The figures of an eval row, in the order the log line shows them.
FIGURES = ("miou", "pacc", "ari_fg", "mbo", "dead_prototypes", "entropy", "active_slots")


def eval_row(epoch: int, step: int, split: str, result: dict, seconds: float) -> dict:
    """The ``metrics.jsonl`` row of one evaluation (docs/contracts.md): non-finite values become ``None``."""
    row = {"kind": "eval", "epoch": epoch, "step": step, "split": split, "num_images": result["num_images"],
           **{k: result.get(k) for k in FIGURES}, "seconds": seconds}
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


class OnlineEval(HookBase):
    """Evaluate the teacher on ``eval.split`` at the epochs the ``eval`` section names (module docstring).

    ``write_row`` appends a row to ``metrics.jsonl`` (rank 0's ``MetricsLog.write``; ``None`` elsewhere);
    ``tb`` is rank 0's TensorBoard writer (a no-op one elsewhere).
    """

    def __init__(self, tb: TBWriter, write_row: Callable[[dict], None] | None) -> None:
        self.tb, self.write_row = tb, write_row
        self.dataset = None

    def before_train(self) -> None:
        # here, not in __init__: the toy scenes are generated while the loader is built
        from pretrain.eval.config import resolve_split
        from pretrain.eval.datasets import HeldOutSplit

        cfg = self.trainer.cfg
        self.split = resolve_split(cfg.eval.split, cfg.data.root)
        self.dataset = HeldOutSplit(self.split, cfg.eval.resolution, cfg.eval.max_images)
        log.info("online evaluation on %s (%d images; %s%s) %s", self.split, len(self.dataset),
                 "semantic masks, " if self.dataset.has_semantic else "",
                 "instance masks" if self.dataset.has_instances else "no masks: prototype health only",
                 self._schedule())

    def _schedule(self) -> str:
        ev = self.trainer.cfg.eval
        every = f"every {ev.every_epochs} epochs" if ev.every_epochs else ""
        return ", ".join(x for x in (every, "at the end" if ev.at_end else "") if x)

    def due(self, epochs_done: int) -> bool:
        """Whether an evaluation follows the epoch that made ``epochs_done`` epochs complete."""
        ev = self.trainer.cfg.eval
        periodic = ev.every_epochs > 0 and epochs_done % ev.every_epochs == 0
        return periodic or (ev.at_end and epochs_done == self.trainer.cfg.train.epochs)

    def after_epoch(self) -> None:
        t = self.trainer
        if not self.due(t.epoch):
            return
        if t.exit_status == "preempted":  # agreed by every rank (StopOnRequest runs first)
            log.warning("online evaluation of epoch %d skipped: stopping on request", t.epoch)
            return
        self.evaluate()

    def evaluate(self) -> dict:
        """Score the teacher now (every rank), log the figures on rank 0; returns the ``metrics.jsonl`` row."""
        from pretrain.eval.online import evaluate_teacher

        t, ev = self.trainer, self.trainer.cfg.eval
        t0 = time.perf_counter()
        result, picture = evaluate_teacher(
            t.method, self.dataset, t.cfg.model.num_prototypes, batch_size=ev.batch_size, device=t.env.device,
            amp_dtype=t.amp_dtype, rank=t.env.rank, world_size=t.env.world_size, num_workers=ev.num_workers,
            picture_images=ev.num_images if t.env.is_main else 0)
        row = eval_row(t.epoch, t.step, str(self.split), result, time.perf_counter() - t0)
        if t.env.is_main:
            if self.write_row is not None:
                self.write_row(row)
            self.tb.scalars({k: row[k] for k in FIGURES if row[k] is not None}, t.epoch, prefix="eval/")
            if picture is not None:
                self.tb.images("eval/assignments", picture, t.epoch)
            self.tb.flush()
            shown = "  ".join(f"{k} {row[k]:.4g}" for k in FIGURES if row[k] is not None)
            log.info("eval after epoch %d (step %d): %s | %d images in %.1f s", t.epoch, t.step, shown,
                     row["num_images"], row["seconds"])
        return row


__all__ = ["FIGURES", "eval_row", "OnlineEval"]
