"""The pretraining loop: one code path for CPU/GPU, one process or many.

:class:`Trainer` runs the recipe's step (:meth:`Trainer.run_step`, SlotCon recipe in DESIGN.md): set the
step's LR (warm-up + cosine), EMA-update the teacher with the step's momentum *before* the forward pass,
forward under autocast, agree on the step's numbers across ranks (one all-reduce of the loss terms,
skipped images and the stop flag, so every rank stops at the same step), abort on a non-finite term
before any update, backward (GradScaler for fp16), optimiser step. Everything else (checkpoints every
``train.checkpoint_every_steps``, at every epoch end and on a stop request; metrics, TensorBoard,
pictures, the progress bar) is a hook (:mod:`pretrain.engine.hooks`).
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
from pretrain.engine.distributed import DistEnv, all_reduce, barrier, maybe_sync_bn, per_rank_batch
from pretrain.engine.hooks import HookBase, default_hooks
from pretrain.engine.logging import setup_text_log
from pretrain.engine.optim import build_optimizer, set_lr
from pretrain.engine.precision import amp_dtype as amp_dtype_of, resolve_amp
from pretrain.engine.schedules import lr_at, momentum_at, peak_lr
from pretrain.engine.signals import shield_workers, stop_requested

log = logging.getLogger("pretrain")


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN/Inf; raised before the optimiser step, so no bad weights are saved."""

    def __init__(self, step: int, term: str, value: float) -> None:
        super().__init__(f"non-finite loss at step {step}: '{term}' = {value}; the last good checkpoint "
                         f"is kept (lower optim.base_lr, check the data, or try train.amp=none)")
        self.step, self.term, self.value = step, term, value


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
        tc, oc = cfg.train, cfg.optim
        self.run_dir = resolve_run_dir(cfg)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if env.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        barrier()
        setup_text_log(self.run_dir, env.is_main)
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
        self._resume()
        self.model: nn.Module = self.method
        if env.distributed:
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.method, device_ids=ids)
        if tc.compile:
            self.model = torch.compile(self.model)

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

    @property
    def epoch_done(self) -> bool:
        """The last step finished the epoch (its checkpoint is the epoch end's)."""
        return self.step_in_epoch >= self.steps_per_epoch

    def state_dict(self) -> dict:
        """The checkpoint of the current step (docs/contracts.md): loads with ``weights_only=True``."""
        return {"model": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {}, "step": self.step,
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "rng": ckpt_io.rng_state(),
                "config": to_dict(self.cfg)}

    def _resume(self) -> None:
        found = _resume_source(self.cfg, self.ckpt_dir)
        if found is None:
            return
        path, state = found
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.step_in_epoch = int(state["step"]), int(state["epoch"]), int(state["step_in_epoch"])
        if self.env.rank == 0 and "rng" in state:
            ckpt_io.set_rng_state(state["rng"])
        else:  # other ranks: a fresh but reproducible stream per (rank, step)
            seed_everything(self.cfg.train.seed + 1000003 * self.env.rank + 7919 * self.step)
        log.info("resumed from %s: step %d, epoch %d, batch %d of the epoch", path, self.step, self.epoch,
                 self.step_in_epoch)

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

        skipped = batch["skipped"].sum() if "skipped" in batch else torch.zeros((), dtype=torch.long)
        self.batch = batch = _to_device(batch, env.device, tc.channels_last)
        with torch.autocast(env.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext():
            out = self.model(batch)
        terms, skipped_total, self.stop_agreed = self._agree(out, skipped)
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
                    "skipped": skipped_total}
        return terms

    def _agree(self, out: dict[str, Tensor], skipped: Tensor) -> tuple[dict[str, float], float, bool]:
        """The step's one host sync: loss terms (rank mean), skipped images (sum) and any rank's stop request."""
        env = self.env
        self.loss_names = list(out)
        vec = torch.stack([out[k].detach().float().reshape(()) for k in self.loss_names]
                          + [skipped.to(env.device).float(),
                             torch.tensor(1.0 if stop_requested() else 0.0, device=env.device)])
        vals = all_reduce(vec).tolist()
        return {k: v / env.world_size for k, v in zip(self.loss_names, vals)}, vals[-2], vals[-1] > 0

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
        finally:
            _close_loader(self.loader)
            for h in self.hooks:
                h.after_train()

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
        NonFiniteLossError: a loss term is NaN/Inf (before that step's update).
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


def _resume_source(cfg: PretrainConfig, ckpt_dir: Path) -> tuple[Path, dict] | None:
    mode = cfg.train.resume
    if mode == "none":
        if ckpt_io.list_checkpoints(ckpt_dir):
            log.warning("train.resume=none but %s holds checkpoints; they will be overwritten/pruned", ckpt_dir)
        return None
    if mode == "auto":
        return ckpt_io.find_latest(ckpt_dir)
    path = Path(mode)
    if not path.is_file():
        raise FileNotFoundError(f"train.resume: checkpoint {path} not found")
    return path, ckpt_io.load_checkpoint(path)


__all__ = ["NonFiniteLossError", "TrainResult", "Trainer", "resolve_run_dir", "seed_everything", "fit"]
