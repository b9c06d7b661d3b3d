"""The pretraining loop: one code path for CPU/GPU, one process or many.

:class:`Trainer` runs the recipe's step (:meth:`Trainer.run_step`, SlotCon recipe in DESIGN.md): set the
step's LR (warm-up + cosine), EMA-update the teacher with the step's momentum *before* the forward pass,
forward under autocast, agree on the step's numbers across ranks (one all-reduce of the loss terms,
skipped images and the stop flag, so every rank stops at the same step), abort on a non-finite term
before any update, backward (GradScaler for fp16), optimiser step. Everything else (checkpoints every
``train.checkpoint_every_steps``, at every epoch end and on a stop request; metrics, TensorBoard,
pictures, the progress bar) is a hook (:mod:`pretrain.engine.hooks`).

Before anything is built, rank 0 locks the run directory and settles its run id
(:mod:`pretrain.engine.rundir`). Resuming takes the newest checkpoint that loads, belongs to the run
and fits the model and optimiser (others are skipped with a warning); ``train.resume=<path>`` must fit
or the run is refused (:class:`~pretrain.engine.rundir.ResumeError`). A resume whose config changes the
run's trajectory is refused unless ``train.allow_config_change`` lists the keys. After a NaN/Inf
(:class:`NonFiniteError`), the checkpoints from that step on are moved to ``checkpoints/quarantine/``
and the error names the checkpoint a rerun resumes from.
"""
from __future__ import annotations

import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pretrain.config import PretrainConfig, save_config, to_dict
from pretrain.engine import checkpoint as ckpt_io
from pretrain.data.loader_base import TooManyBadImages
from pretrain.engine.checkpoint import NonFiniteError, NonFiniteStateError
from pretrain.engine.distributed import (DistEnv, all_reduce, barrier, broadcast_object, maybe_sync_bn,
                                        per_rank_batch)
from pretrain.engine.rundir import ConfigChanges, ResumeError, RunDirLock, config_changes, prepare_run_dir
from pretrain.engine.hooks import HookBase, default_hooks
from pretrain.engine.logging import setup_text_log
from pretrain.engine.optim import build_optimizer, set_lr
from pretrain.engine.precision import ScalerWatch, amp_dtype as amp_dtype_of, resolve_amp
from pretrain.engine.schedules import lr_at, momentum_at, peak_lr
from pretrain.engine.signals import shield_workers, stop_requested

log = logging.getLogger("pretrain")


class NonFiniteLossError(NonFiniteError):
    """A loss term became NaN/Inf; raised before the optimiser step, so no bad weights are saved."""

    def __init__(self, step: int, term: str, value: float) -> None:
        super().__init__(step, f"non-finite loss at step {step}: '{term}' = {value}")
        self.term, self.value = term, value


@dataclass
class TrainResult:
    """How :func:`fit` ended."""

    status: str  # finished | max_steps | preempted
    step: int
    epoch: int
    run_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)  # per-step metrics of this process


def resolve_run_dir(cfg: PretrainConfig) -> Path:
    """``train.run_dir`` if set, else ``train.output_dir/<name>``."""
    return Path(cfg.train.run_dir) if cfg.train.run_dir else Path(cfg.train.output_dir) / cfg.name


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_device(batch: dict[str, Tensor], device: torch.device, channels_last: bool) -> dict[str, Tensor]:
    out = {}
    for k, v in batch.items():
        if not isinstance(v, Tensor):
            out[k] = v
        elif v.dim() == 4 and channels_last:
            out[k] = v.to(device, non_blocking=True, memory_format=torch.channels_last)
        else:
            out[k] = v.to(device, non_blocking=True)
    return out


class Trainer:
    """The run's state (method, optimiser, loader, step counters) and the loop over it; see the module docstring.

    Hooks read ``step`` (steps done), ``epoch``, ``step_in_epoch``, ``row`` (the last step's logged values),
    ``batch`` (its device batch), ``loss_names``, ``timings`` (data wait, compute seconds), ``epoch_done`` and
    ``stop_agreed``, and set ``exit_status`` ("preempted", ...) to end the loop after the current step.
    """

    def __init__(self, cfg: PretrainConfig, env: DistEnv, hooks: list[HookBase] | None = None) -> None:
        from pretrain.data import build_pretrain_loader
        from pretrain.methods import build_method

        self.cfg, self.env = cfg, env
        self.run_dir = resolve_run_dir(cfg)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.lock: RunDirLock | None = None
        self.run_id = self._take_run_dir()
        try:
            self._build(cfg, env, build_method, build_pretrain_loader)
        except BaseException:
            self.close()
            raise

        self.history: list[dict[str, float]] = []
        self.row: dict[str, float] = {}
        self.batch: dict[str, Tensor] = {}
        self.loss_names: list[str] = []
        self.timings = (0.0, 0.0)
        self.stop_agreed = False
        self.exit_status: str | None = None
        self.hooks = list(hooks or []) + default_hooks(self)  # extra hooks first: a stop they ask for is this step's
        for h in self.hooks:
            h.trainer = self

    def _take_run_dir(self) -> str:
        """Rank 0 locks the run dir, cleans it and settles the run id; every rank learns the outcome together,
        so a refusal on rank 0 ends every rank instead of leaving them waiting in a collective."""
        env, error, run_id = self.env, None, None
        if env.is_main:
            try:
                self.lock = RunDirLock(self.run_dir).acquire()
                setup_text_log(self.run_dir, True)  # after the lock: a refused run stays out of the holder's log
                run_id = prepare_run_dir(self.run_dir, self.cfg.train.resume, exclusive=self.lock.held)
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the other ranks know
                error = e
        else:
            setup_text_log(self.run_dir, False)
        if not _all_ranks_ok(error is None, env):
            self.close()
            if error is not None:
                raise error
            raise RuntimeError(f"rank 0 could not take the run directory {self.run_dir}; see its log")
        return run_id if run_id is not None else (ckpt_io.read_run_id(self.run_dir) or "")

    def _build(self, cfg: PretrainConfig, env: DistEnv, build_method, build_pretrain_loader) -> None:
        tc, oc = cfg.train, cfg.optim
        if tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif env.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        # Same seed on every rank for the model (DDP also broadcasts rank 0's weights); per-rank
        # seeds afterwards. Augmentation randomness is derived from (seed, epoch, index) by the data.
        seed_everything(tc.seed)
        method = maybe_sync_bn(build_method(cfg.model), env).to(env.device)
        self.method = method.to(memory_format=torch.channels_last) if tc.channels_last else method
        seed_everything(tc.seed + 1000003 * env.rank)

        self.local_batch = per_rank_batch(oc.batch_size, env.world_size)
        self.loader = build_pretrain_loader(cfg.data, self.local_batch, rank=env.rank, world_size=env.world_size,
                                            seed=tc.seed, device=env.device, drop_last=True)
        self.loader.defer_bad_image_error()  # agreed in the step's all-reduce (run_step)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"data: fewer images than one global batch ({oc.batch_size}); lower optim.batch_size")
        self.total_steps = tc.epochs * self.steps_per_epoch
        self.warmup_steps = int(round(oc.warmup_epochs * self.steps_per_epoch))
        self.lr_peak = peak_lr(oc.base_lr, oc.batch_size, oc.scale_lr)
        self.optimizer = build_optimizer(self.method, oc.name, lr=self.lr_peak, weight_decay=oc.weight_decay,
                                         momentum=oc.momentum, eta=oc.lars_eta)
        self.amp = resolve_amp(tc.amp, env.device)
        self.amp_dtype = amp_dtype_of(self.amp)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.amp == "fp16")

        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.resumed_from: Path | None = None
        self._resume()
        self.scaler_watch = ScalerWatch(self.scaler)
        if env.is_main:  # only now: a refused resume must not overwrite the run's config.yaml
            save_config(cfg, self.run_dir / "config.yaml")
        self.model: nn.Module = self.method
        if env.distributed:
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.method, device_ids=ids)
        if tc.compile:
            self.model = torch.compile(self.model)

    def close(self) -> None:
        """Release the run directory's lock (idempotent; :meth:`train` calls it when it ends)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    @property
    def epoch_done(self) -> bool:
        """The last step finished the epoch (its checkpoint is the epoch end's)."""
        return self.step_in_epoch >= self.steps_per_epoch

    def state_dict(self) -> dict:
        """The checkpoint of the current step (docs/contracts.md): loads with ``weights_only=True``."""
        return {"model": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {}, "step": self.step,
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "rng": ckpt_io.rng_state(),
                "config": to_dict(self.cfg), "run_id": self.run_id}

    def fits(self, state: dict) -> str | None:
        """Why a loaded checkpoint cannot be resumed into this run's method and optimiser (``None``: it can)."""
        return ckpt_io.fit_problems(state, self.method, self.optimizer)

    def _resume(self) -> None:
        error, found = None, None
        try:
            found = self._resume_source()
            if found is not None:
                self._check_config(*found)
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the other ranks know
            error = e
        if not _all_ranks_ok(error is None, self.env):
            if error is not None:
                raise error
            raise ResumeError("another rank refused to resume; see its log")
        if self.env.distributed:  # the same step on every rank, or none trains
            step = torch.tensor([1, -1], device=self.env.device) * (int(found[1]["step"]) if found else 0)
            hi, neg_lo = all_reduce(step, op="max").tolist()
            if hi != -neg_lo:
                raise ResumeError(f"the ranks would resume from different steps ({-neg_lo} to {hi})")
        if found is None:
            return
        path, state = found
        self.resumed_from = path
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") and self.scaler.is_enabled():  # train.amp may change (another GPU type)
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.step_in_epoch = int(state["step"]), int(state["epoch"]), int(state["step_in_epoch"])
        if self.env.rank == 0 and "rng" in state:
            ckpt_io.set_rng_state(state["rng"])
        else:  # other ranks: a fresh but reproducible stream per (rank, step)
            seed_everything(self.cfg.train.seed + 1000003 * self.env.rank + 7919 * self.step)
        log.info("resumed from %s: step %d, epoch %d, batch %d of the epoch", path, self.step, self.epoch,
                 self.step_in_epoch)

    def _resume_source(self) -> tuple[Path, dict] | None:
        """The checkpoint to resume, the same on every rank (``None``: start at step 0).

        Each rank reading the folder itself could pick different files (a newest checkpoint that one
        node cannot read yet), and the ranks would train from different weights. Rank 0 chooses, every
        rank loads its choice, and a file that some rank cannot read or fit is skipped by all of them.
        """
        mode = self.cfg.train.resume
        if mode == "none":  # a previous run was moved aside by prepare_run_dir
            return None
        if mode != "auto":
            return self._explicit_resume(Path(mode))
        if not self.env.distributed:
            return ckpt_io.find_latest(self.ckpt_dir, run_id=self.run_id, check=self.fits)
        return self._agreed_latest()

    def _explicit_resume(self, path: Path) -> tuple[Path, dict]:
        if not path.is_file():
            raise ResumeError(f"train.resume={path}: no such checkpoint file")
        try:
            state = ckpt_io.load_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any reason it does not load is the user's to see
            raise ResumeError(f"train.resume={path} cannot be read: {type(e).__name__}: {e}") from None
        reason = self.fits(state)
        if reason:
            raise ResumeError(f"train.resume={path} does not fit this run's model/optimiser: {reason}")
        return path, state

    def _agreed_latest(self) -> tuple[Path, dict] | None:
        """``train.resume=auto`` over several ranks: rank 0's newest good checkpoint that every rank can load."""
        rejected: list[Path] = []
        while True:
            found = None
            if self.env.is_main:
                found = ckpt_io.find_latest(self.ckpt_dir, run_id=self.run_id, check=self.fits, skip=rejected)
            choice = broadcast_object(str(found[0]) if found else None)
            if choice is None:
                if rejected:
                    raise ResumeError(f"no checkpoint in {self.ckpt_dir} loads on every rank (tried "
                                      f"{', '.join(p.name for p in rejected)}); see the ranks' warnings")
                return None
            path = Path(choice)
            problem = None
            if not self.env.is_main:
                try:
                    found = path, ckpt_io.load_checkpoint(path)
                    problem = self.fits(found[1])
                except Exception as e:  # noqa: BLE001 - skipped on every rank, loudly
                    problem = f"{type(e).__name__}: {e}"
                if problem:
                    log.warning("rank %d cannot resume %s (%s): every rank skips it", self.env.rank, path, problem)
            if _all_ranks_ok(problem is None, self.env):
                return found
            if self.env.is_main:
                log.warning("skipping checkpoint %s: another rank cannot load it (see its log)", path)
            rejected.append(path)

    def _check_config(self, path: Path, state: dict) -> None:
        """Refuse a resume whose config changes the run's trajectory, unless train.allow_config_change says so."""
        from pretrain.config import PretrainConfig as Schema

        changes: ConfigChanges = config_changes(state.get("config"), to_dict(self.cfg),
                                                self.cfg.train.allow_config_change, to_dict(Schema()))
        if changes.refused:
            keys = ",".join(k for k, _, _ in changes.refused)
            raise ResumeError(
                f"refusing to resume {path}: the config changes the run's trajectory: "
                f"{ConfigChanges.describe(changes.refused)}. Run with the checkpoint's values, allow the change "
                f"with train.allow_config_change=[{keys}], or start over with train.resume=none")
        if changes.allowed:
            log.warning("resuming %s with changed config (train.allow_config_change): %s", path,
                        ConfigChanges.describe(changes.allowed))
        if changes.free:
            log.info("resuming %s with changed settings: %s", path, ConfigChanges.describe(changes.free))

    def run_step(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """One step of the recipe; returns the step's loss terms averaged over ranks.

        Raises:
            NonFiniteLossError: a loss term is NaN/Inf (before the update).
        """
        env, tc = self.env, self.cfg.train
        lr = lr_at(self.step, self.total_steps, self.warmup_steps, self.lr_peak, self.cfg.optim.min_lr)
        momentum = momentum_at(self.step, self.total_steps, self.cfg.model.teacher_momentum)
        set_lr(self.optimizer, lr)
        self.method.update_teacher(momentum)  # recipe: EMA before the step's forward pass

        self.batch = batch = _to_device(batch, env.device, tc.channels_last)
        skipped = batch["skipped"].sum() if "skipped" in batch else torch.zeros((), device=env.device)
        with torch.autocast(env.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext():
            out = self.model(batch)
        terms, skipped_total, self.stop_agreed, bad_ranks = self._agree(out, skipped)
        if bad_ranks:  # every rank raises at the same step; none is left waiting in a collective
            raise TooManyBadImages(self.loader.bad_image_error or f"{bad_ranks} other rank(s) found more undecodable "
                                   "images than data.max_bad_fraction allows; their log names the files")
        for k, v in terms.items():
            if not math.isfinite(v):
                raise NonFiniteLossError(self.step, k, v)

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out["loss"]).backward()
        if self.cfg.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.method.parameters(), self.cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.row = {"step": self.step, "epoch": self.epoch, **terms, "lr": lr, "teacher_momentum": momentum,
                    "skipped": skipped_total, **self.scaler_watch.after_update(self.step)}
        return terms

    def _agree(self, out: dict[str, Tensor], skipped: Tensor) -> tuple[dict[str, float], float, bool, int]:
        """The step's one host sync: loss terms (rank mean), skipped images (sum), any rank's stop request
        and how many ranks are past the bad-image limit."""
        env = self.env
        self.loss_names = list(out)
        flags = [1.0 if stop_requested() else 0.0, 1.0 if self.loader.bad_image_error else 0.0]
        vec = torch.stack([out[k].detach().float().reshape(()) for k in self.loss_names] + [skipped.float()]
                          # torch.full writes on the device; torch.tensor(x, device=) would be a blocking copy
                          + [torch.full((), f, device=env.device) for f in flags])
        vals = all_reduce(vec).tolist()
        return ({k: v / env.world_size for k, v in zip(self.loss_names, vals)}, vals[-3], vals[-2] > 0,
                int(round(vals[-1])))

    def train(self) -> TrainResult:
        """Run the remaining steps; returns how it ended (``finished``, ``max_steps`` or ``preempted``)."""
        tc = self.cfg.train
        log.info("run dir %s | %d rank(s) on %s | global batch %d (%d/rank) | %d steps/epoch, %d epochs, %d steps | "
                 "peak lr %.4g | amp %s", self.run_dir, self.env.world_size, self.env.device, self.cfg.optim.batch_size,
                 self.local_batch, self.steps_per_epoch, tc.epochs, self.total_steps, self.lr_peak,
                 self.amp if self.amp == tc.amp else f"{tc.amp} -> {self.amp}")
        if self.epoch_done:  # resumed from an epoch end's checkpoint
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if tc.max_steps and self.step >= tc.max_steps:  # restarted after reaching max_steps: nothing to do
            self.exit_status = "max_steps"
        try:
            for h in self.hooks:
                h.before_train()
            while self.exit_status is None and self.epoch < tc.epochs:
                self._train_epoch()
            return self._finish(self.exit_status or "finished")
        except NonFiniteError as e:
            if self.env.is_main:
                try:
                    e.outcome = self._quarantine_after(e.step)
                except Exception as q:  # noqa: BLE001 - never hide the NaN behind a file error
                    e.outcome = (f"could not move the checkpoints of step {e.step} or later aside "
                                 f"({type(q).__name__}: {q}): remove them by hand before a rerun")
            else:
                e.outcome = "rank 0's log says which checkpoint a rerun resumes from"
            raise
        finally:
            try:
                _close_loader(self.loader)
                for h in self.hooks:
                    h.after_train()
            finally:
                self.close()

    def _quarantine_after(self, step: int) -> str:
        """Move this run's checkpoints of ``step`` or later aside; say which one a rerun resumes from.

        They were written after the update that blew up (or just before the step that did), and may hold
        huge but finite weights that no check at write time can tell from good ones.
        """
        moved = ckpt_io.quarantine(self.ckpt_dir, step, self.run_id)
        text = (f"moved {len(moved)} checkpoint(s) of step {step} or later to {self.ckpt_dir / ckpt_io.QUARANTINE}/ "
                f"({', '.join(p.name for p in moved)}); " if moved else "")
        resume = next((c for c in ckpt_io.scan(self.ckpt_dir) if c.loads and ckpt_io.belongs(
            {"run_id": c.run_id}, self.run_id)), None)
        if resume is None:
            return text + "no earlier checkpoint of this run is left: a rerun starts from step 0"
        return text + f"a rerun resumes from {resume.path} (step {resume.step})"

    def _train_epoch(self) -> None:
        self.loader.set_epoch(self.epoch)
        self.method.train()
        for h in self.hooks:
            h.before_epoch()
        t_prev = time.perf_counter()
        for batch in shield_workers(self.loader.iter_from(self.step_in_epoch)):
            t_start = time.perf_counter()
            for h in self.hooks:
                h.before_step()
            self.run_step(batch)
            self.timings = (t_start - t_prev, time.perf_counter() - t_start)
            self.history.append(self.row)
            self.step += 1
            self.step_in_epoch += 1
            if self.cfg.train.max_steps and self.step >= self.cfg.train.max_steps:
                self.exit_status = "max_steps"
            for h in self.hooks:
                h.after_step()
            if self.exit_status is not None and not self.epoch_done:
                return
            if self.epoch_done:
                break
            t_prev = time.perf_counter()
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        for h in self.hooks:
            h.after_epoch()

    def _finish(self, status: str) -> TrainResult:
        if status != "preempted":
            if self.env.is_main and self.cfg.train.export_backbone:
                p = ckpt_io.export_backbone(self.method.teacher_backbone(), self.cfg.model.arch,
                                            self.run_dir / "teacher_backbone.pth",
                                            ckpt_io.encoder_variant(to_dict(self.cfg)["model"]))
                log.info("exported teacher backbone to %s", p)
            barrier()
            log.info("training %s at step %d (epoch %d)", status, self.step, self.epoch)
        return TrainResult(status, self.step, self.epoch, self.run_dir, self.history)


def fit(cfg: PretrainConfig, env: DistEnv, hooks: list[HookBase] | None = None) -> TrainResult:
    """Train (or resume) the run described by ``cfg`` on this rank; ``hooks`` run before the default ones.

    Raises:
        NonFiniteError: a loss term is NaN/Inf (before that step's update), or the weights about to be
            checkpointed are; the message names the checkpoint a rerun resumes from.
        ResumeError: the checkpoint to resume does not fit, or the config changes the run's trajectory.
        RunDirLocked: another run holds the run directory.
        CheckpointWriteError: a checkpoint could not be written (disk full).
    """
    return Trainer(cfg, env, hooks).train()


def _close_loader(loader) -> None:
    """Shut the loader's worker processes down now rather than at interpreter exit.

    Workers are forked with the stop signals blocked (``shield_workers``), so the SIGTERM that
    ``multiprocessing`` sends them at exit would not end them; the loader's own shutdown (done
    event) does. Uses ``loader.close()`` where the loader has one, else the PyTorch iterator's.
    """
    close = getattr(loader, "close", None)
    if callable(close):
        close()
        return
    dl = getattr(loader, "loader", None)
    it = getattr(dl, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
        dl._iterator = None


def _all_ranks_ok(ok: bool, env: DistEnv) -> bool:
    """Whether every rank reports ``ok`` (one all-reduce; the local answer in a single process)."""
    if not env.distributed:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=env.device if env.device.type == "cuda" else "cpu")
    return all_reduce(flag).item() == 0


__all__ = ["NonFiniteError", "NonFiniteLossError", "NonFiniteStateError", "TrainResult", "Trainer", "resolve_run_dir",
           "seed_everything", "fit"]
