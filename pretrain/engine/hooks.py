"""Hooks of the training loop: checkpoints, stop requests, logs, TensorBoard, pictures, progress bar
(and, in :mod:`pretrain.engine.eval_hook`, the online evaluation).

In the spirit of Detectron2's ``HookBase``: :class:`pretrain.engine.trainer.Trainer` runs the recipe's
step and calls each hook at fixed points; a hook reads the trainer's state (``trainer.step``,
``trainer.row``, ``trainer.batch``, ...) and may ask it to stop (``trainer.exit_status``). Hooks run in
list order at every point; :func:`default_hooks` gives the order the loop relies on (stop requests
before checkpoints, so a stop is saved at its own step; the step's metrics row before its checkpoint).
"""
from __future__ import annotations

import errno
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import torch

from pretrain.engine import checkpoint as ckpt_io
from pretrain.engine.checkpoint import CheckpointWriteError, NonFiniteStateError
from pretrain.engine.distributed import all_reduce
from pretrain.engine.logging import TBWriter, memory_mb, slot_picture
from pretrain.engine.signals import stop_reason, stop_requested

if TYPE_CHECKING:
    from pretrain.engine.trainer import Trainer

log = logging.getLogger("pretrain")


class HookBase:
    """A no-op at every point; subclasses override the points they need. ``self.trainer`` is set by the trainer."""

    trainer: Trainer

    def before_train(self) -> None:
        """Once, after the model, optimiser and resume state are ready."""

    def before_epoch(self) -> None:
        """At the start of every epoch (also the partial one a resume continues)."""

    def before_step(self) -> None:
        """Before the step's LR, EMA and forward pass."""

    def after_step(self) -> None:
        """After the optimiser step; ``trainer.row`` holds the step's logged values, ``trainer.step`` counts it."""

    def after_epoch(self) -> None:
        """After the last step of an epoch (``trainer.epoch`` is already the next one)."""

    def after_train(self) -> None:
        """Once, however training ended (also on an exception), for closing files."""


class StopOnRequest(HookBase):
    """SIGTERM / SIGUSR1 / :func:`pretrain.engine.signals.request_stop`: save at this step and return ``preempted``.

    Mid-epoch the ranks agree through the step's one all-reduce (``trainer.stop_agreed``); at an epoch end,
    where that flag may predate the request, through one extra all-reduce.
    """

    def after_step(self) -> None:
        t = self.trainer
        if t.step >= t.total_steps:  # the run ends with this step anyway, as "finished"
            return
        if t.stop_agreed if t.env.distributed else stop_requested():
            t.exit_status = "preempted"
            log.warning("stop requested (%s): checkpoint at step %d, then exiting", stop_reason() or "another rank",
                        t.step)

    def after_epoch(self) -> None:
        t = self.trainer
        if t.exit_status is None and t.epoch < t.cfg.train.epochs and _agree_stop(t.env.distributed):
            t.exit_status = "preempted"
            log.warning("stop requested (%s) at the end of epoch %d; exiting", stop_reason() or "another rank",
                        t.epoch - 1)


def _agree_code(code: int, env) -> int:
    """The largest of every rank's ``code`` (one all-reduce; the local code in a single process)."""
    if not env.distributed:
        return code
    flag = torch.tensor([float(code)], device=env.device if env.device.type == "cuda" else "cpu")
    return int(all_reduce(flag, op="max").item())


def _agree_stop(distributed: bool) -> bool:
    if not distributed:
        return stop_requested()
    flag = torch.tensor([1.0 if stop_requested() else 0.0])
    if torch.distributed.get_backend() == "nccl":
        flag = flag.cuda()
    return all_reduce(flag).item() > 0


class PeriodicCheckpoint(HookBase):
    """A checkpoint every ``train.checkpoint_every_steps``, at every epoch end and when the loop is told to stop.

    Rank 0 writes (atomically, pruned to ``train.keep_last`` of this run's usable checkpoints); every rank
    waits for the outcome, so no rank runs ahead of a checkpoint that a requeued job resumes from, and a
    failed write or a refused one ends every rank rather than leaving the others in a collective.

    Refused: a state holding NaN/Inf (:class:`~pretrain.engine.checkpoint.NonFiniteStateError`). Kept
    besides the ``keep_last`` newest: the previous checkpoint, the newest one known to be followed by a
    finite step (with ``keep_last=1`` the newest alone could be the one taken just before a blow-up).
    """

    def __init__(self, every_steps: int, keep_last: int) -> None:
        self.every, self.keep_last = every_steps, keep_last
        self.previous: Path | None = None

    def before_train(self) -> None:
        self.previous = self.trainer.resumed_from

    def after_step(self) -> None:
        t = self.trainer
        if t.epoch_done:  # the epoch end's checkpoint follows
            return
        if t.exit_status is not None or (self.every and t.step % self.every == 0):
            self.save()

    def after_epoch(self) -> None:
        self.save()

    def save(self) -> None:
        """Write the current step's checkpoint on rank 0; raise on every rank if it was refused or failed."""
        t = self.trainer
        error: BaseException | None = None
        if t.env.is_main:
            keep = [self.previous] if self.previous is not None and self.previous.exists() else []
            try:
                path = ckpt_io.save_checkpoint(t.ckpt_dir, t.state_dict(), self.keep_last, keep=keep)
            except (NonFiniteStateError, CheckpointWriteError) as e:
                error = e
            else:
                if path != self.previous:
                    self.previous = path
                log.info("checkpoint %s", path)
        code = _agree_code(0 if error is None else 1 if isinstance(error, NonFiniteStateError) else 2, t.env)
        if error is not None:
            raise error
        if code == 1:
            raise NonFiniteStateError(t.step, "a tensor on rank 0")
        if code == 2:
            raise CheckpointWriteError(errno.EIO, "rank 0 could not write the checkpoint; see its log")


class MetricsLog(HookBase):
    """Rank 0: one JSON line per step in ``metrics.jsonl`` (losses, LR, momentum: plots and exact-resume checks).

    Other hooks append their own rows through :meth:`write` (the online evaluation's, marked
    ``"kind": "eval"``); :func:`metrics_rows` reads either kind back.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = None

    def before_train(self) -> None:
        self.f = open(self.path, "a")

    def after_step(self) -> None:
        self.f.write(json.dumps(self.trainer.row) + "\n")
        self.f.flush()

    def write(self, row: dict) -> None:
        """Append one row of another kind; strict JSON (a NaN/Inf is an error: write ``None`` instead)."""
        self.f.write(json.dumps(row, allow_nan=False) + "\n")
        self.f.flush()

    def after_train(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


class ScalarsAndText(HookBase):
    """Every ``log.every_steps``: the step's terms, LR, speed and memory to TensorBoard and the text log;
    at every epoch end the epoch's means and the skipped-image count."""

    def __init__(self, tb: TBWriter, every_steps: int) -> None:
        self.tb, self.every = tb, every_steps
        self.sums: dict[str, float] = {}
        self.count = 0

    def before_epoch(self) -> None:
        self.sums, self.count = {}, 0

    def after_step(self) -> None:
        t = self.trainer
        row, step = t.row, t.step - 1
        terms = {k: row[k] for k in t.loss_names}
        for k, v in {**terms, "skipped": row["skipped"]}.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        if self.every and step % self.every == 0:
            t_data, t_compute = t.timings
            amp = {k: row[k] for k in ("amp_scale", "amp_skipped_steps") if k in row}  # fp16's GradScaler
            self.tb.scalars({**terms, "lr": row["lr"], "teacher_momentum": row["teacher_momentum"],
                             "images_per_s": t.cfg.optim.batch_size / max(t_data + t_compute, 1e-9),
                             "time_data_s": t_data, "time_compute_s": t_compute,
                             "memory_mb": memory_mb(t.env.device), **amp}, step)
            log.info("epoch %d step %d/%d  %s  lr %.4g  m %.5f%s", row["epoch"], step, t.total_steps,
                     "  ".join(f"{k} {v:.4f}" for k, v in terms.items()), row["lr"], row["teacher_momentum"],
                     f"  scale {amp['amp_scale']:.3g} skipped {amp['amp_skipped_steps']}" if amp else "")

    def after_epoch(self) -> None:
        if not self.count:
            return
        t = self.trainer
        means = {k: v / self.count for k, v in self.sums.items() if k != "skipped"}
        skipped = int(self.sums.get("skipped", 0.0))
        log.info("epoch %d done: %s | skipped bad images %d (this rank's loader total %d)", t.epoch - 1,
                 "  ".join(f"{k} {v:.4f}" for k, v in means.items()), skipped, getattr(t.loader, "bad_images", 0))
        self.tb.scalars({**means, "skipped_images": skipped}, t.epoch - 1, prefix="epoch/")
        self.tb.flush()

    def after_train(self) -> None:
        self.tb.close()


class SlotPictures(HookBase):
    """Every ``log.image_every_steps``: both views of a few samples with the teacher's assignment overlaid."""

    def __init__(self, tb: TBWriter, every_steps: int, num_images: int) -> None:
        self.tb, self.every, self.n = tb, every_steps, num_images

    def after_step(self) -> None:
        t = self.trainer
        if (t.step - 1) % self.every == 0:
            self.tb.images("slots/view1_then_view2", slot_picture(t.method, t.batch, self.n), t.step - 1)


class ProgressBar(HookBase):
    """A tqdm bar over the run's steps with the loss and LR."""

    def __init__(self) -> None:
        self.bar = None

    def before_train(self) -> None:
        from tqdm import tqdm

        t = self.trainer
        self.bar = tqdm(total=t.cfg.train.max_steps or t.total_steps, initial=t.step, desc=t.cfg.name,
                        dynamic_ncols=True, mininterval=1.0)

    def after_step(self) -> None:
        row = self.trainer.row
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.3g}", refresh=False)

    def after_train(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def progress_bar_on(setting: str | bool, stream: TextIO | None = None) -> bool:
    """``log.progress_bar``: ``true``/``false`` as given; ``auto`` only when ``stream`` is a terminal
    (default: stderr, where tqdm draws the bar).

    A bar redraws itself with carriage returns, which a SLURM output file keeps, one per refresh.
    """
    value = str(setting).lower()
    if value != "auto":
        return value == "true"
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def metrics_rows(path: Path, kind: str = "train") -> list[dict]:
    """The rows of one kind in a ``metrics.jsonl``: ``train`` (one per step, no ``kind`` key) or ``eval``
    (the online evaluation's, ``"kind": "eval"``), in file order. A line cut by SIGKILL is skipped; where a
    resumed run logged a step or an epoch again, both rows are returned (readers let the last one win)."""
    rows = []
    path = Path(path)
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("kind", "train") == kind:
            rows.append(r)
    return rows


def default_hooks(trainer: Trainer) -> list[HookBase]:
    """The production hooks for ``trainer``'s config, in the order the loop relies on."""
    from pretrain.engine.eval_hook import OnlineEval  # it imports HookBase from here

    cfg, is_main = trainer.cfg, trainer.env.is_main
    hooks: list[HookBase] = [StopOnRequest()]
    metrics = None
    if is_main:
        # metrics.jsonl before the checkpoint: a kill -9 right after a checkpoint must not lose the rows of
        # the steps it covers (a resume never redoes them)
        metrics = MetricsLog(trainer.run_dir / "metrics.jsonl")
        hooks.append(metrics)
    tb = TBWriter(trainer.run_dir / "tb" if is_main and cfg.log.tensorboard else None)
    if cfg.eval.enabled:  # every rank: each scores its shard; the epoch's eval row lands before its checkpoint
        hooks.append(OnlineEval(tb, metrics.write if metrics is not None else None))
    hooks.append(PeriodicCheckpoint(cfg.train.checkpoint_every_steps, cfg.train.keep_last))
    if is_main:
        hooks.append(ScalarsAndText(tb, cfg.log.every_steps))
        if cfg.log.image_every_steps:
            hooks.append(SlotPictures(tb, cfg.log.image_every_steps, cfg.log.num_images))
        if progress_bar_on(cfg.log.progress_bar):
            hooks.append(ProgressBar())
    return hooks


__all__ = ["HookBase", "StopOnRequest", "PeriodicCheckpoint", "MetricsLog", "ScalarsAndText", "SlotPictures",
           "ProgressBar", "progress_bar_on", "metrics_rows", "default_hooks"]
