"""The pretraining loop: one code path for CPU/GPU, one process or many.

Per step (SlotCon recipe, DESIGN.md): set the LR of the step (warm-up + cosine), EMA-update
the teacher with the step's momentum *before* the forward pass, forward under autocast, one
all-reduce of (loss terms, skipped images, stop flag) so every rank sees the same numbers and
stops at the same step, abort on a non-finite term before any update, backward (GradScaler
for fp16), optimiser step. Checkpoints every ``train.checkpoint_every_steps``, at every epoch
end, on a stop request (SIGTERM/SIGUSR1) and at the end.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pretrain.config import PretrainConfig, save_config, to_dict
from pretrain.engine import checkpoint as ckpt_io
from pretrain.engine.distributed import DistEnv, all_reduce, barrier, maybe_sync_bn, per_rank_batch
from pretrain.engine.logging import TBWriter, memory_mb, setup_text_log, slot_picture
from pretrain.engine.optim import build_optimizer, set_lr
from pretrain.engine.precision import amp_dtype as amp_dtype_of, resolve_amp
from pretrain.engine.schedules import lr_at, momentum_at, peak_lr
from pretrain.engine.signals import shield_workers, stop_reason, stop_requested

log = logging.getLogger("pretrain")


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN/Inf; raised before the optimiser step, so no bad weights are saved."""

    def __init__(self, step: int, term: str, value: float) -> None:
        super().__init__(f"non-finite loss at step {step}: '{term}' = {value}; the last good checkpoint "
                         f"is kept (lower optim.base_lr, check the data, or try train.amp=none)")
        self.step, self.term, self.value = step, term, value


@dataclass
class TrainHooks:
    """Optional callbacks (tests, experiments); plain functions so they survive ``spawn``."""

    on_model: Callable[[nn.Module], None] | None = None  # after every switch to train mode
    on_step: Callable[[int, dict[str, float]], None] | None = None  # after each optimiser step (all ranks)


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


class _Metrics:
    """Append-only per-step JSON lines (rank 0): losses/lr/momentum for plots and exact-resume checks."""

    def __init__(self, path: Path | None) -> None:
        self.f = open(path, "a") if path is not None else None

    def write(self, row: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def fit(cfg: PretrainConfig, env: DistEnv, hooks: TrainHooks | None = None) -> TrainResult:
    """Train (or resume) the run described by ``cfg`` on this rank. See the module docstring.

    Raises:
        NonFiniteLossError: a loss term is NaN/Inf (before that step's update).
    """
    from pretrain.data import build_pretrain_loader
    from pretrain.methods import build_method

    hooks = hooks or TrainHooks()
    tc, oc = cfg.train, cfg.optim
    run_dir = resolve_run_dir(cfg)
    ckpt_dir = run_dir / "checkpoints"
    if env.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    barrier()
    setup_text_log(run_dir, env.is_main)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # Same seed on every rank for the model (DDP also broadcasts rank 0's weights); per-rank
    # seeds afterwards. Augmentation randomness is derived from (seed, epoch, index) by the data.
    seed_everything(tc.seed)
    method = build_method(cfg.model)
    method = maybe_sync_bn(method, env).to(env.device)
    if tc.channels_last:
        method = method.to(memory_format=torch.channels_last)
    seed_everything(tc.seed + 1000003 * env.rank)

    local_batch = per_rank_batch(oc.batch_size, env.world_size)
    loader = build_pretrain_loader(cfg.data, local_batch, rank=env.rank, world_size=env.world_size,
                                   seed=tc.seed, device=env.device, drop_last=True)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"data: fewer images than one global batch ({oc.batch_size}); lower optim.batch_size")
    total_steps = tc.epochs * steps_per_epoch
    warmup_steps = int(round(oc.warmup_epochs * steps_per_epoch))
    lr_peak = peak_lr(oc.base_lr, oc.batch_size, oc.scale_lr)
    optimizer = build_optimizer(method, oc.name, lr=lr_peak, weight_decay=oc.weight_decay,
                                momentum=oc.momentum, eta=oc.lars_eta)
    amp = resolve_amp(tc.amp, env.device)
    amp_dtype = amp_dtype_of(amp)
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp == "fp16")

    step, epoch, step_in_epoch = 0, 0, 0
    found = _resume_source(cfg, ckpt_dir)
    if found is not None:
        path, state = found
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, epoch, step_in_epoch = int(state["step"]), int(state["epoch"]), int(state["step_in_epoch"])
        if env.rank == 0 and "rng" in state:
            ckpt_io.set_rng_state(state["rng"])
        else:  # other ranks: a fresh but reproducible stream per (rank, step)
            seed_everything(tc.seed + 1000003 * env.rank + 7919 * step)
        log.info("resumed from %s: step %d, epoch %d, batch %d of the epoch", path, step, epoch, step_in_epoch)
        del state

    model: nn.Module = method
    if env.distributed:
        ids = [env.device.index] if env.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(method, device_ids=ids)
    if tc.compile:
        model = torch.compile(model)

    is_main = env.is_main
    tb = TBWriter(run_dir / "tb" if (is_main and cfg.log.tensorboard) else None)
    metrics = _Metrics(run_dir / "metrics.jsonl" if is_main else None)
    bar = None
    if is_main and cfg.log.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=tc.max_steps or total_steps, initial=step, desc=cfg.name, dynamic_ncols=True,
                   mininterval=1.0)
    log.info("run dir %s | %d rank(s) on %s | global batch %d (%d/rank) | %d steps/epoch, %d epochs, %d steps | "
             "peak lr %.4g | amp %s", run_dir, env.world_size, env.device, oc.batch_size, local_batch,
             steps_per_epoch, tc.epochs, total_steps, lr_peak, amp if amp == tc.amp else f"{tc.amp} -> {amp}")

    def state_dict() -> dict:
        return {"model": method.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {}, "step": step, "epoch": epoch,
                "step_in_epoch": step_in_epoch, "rng": ckpt_io.rng_state(), "config": to_dict(cfg)}

    def save() -> None:
        if is_main:
            p = ckpt_io.save_checkpoint(ckpt_dir, state_dict(), tc.keep_last)
            log.info("checkpoint %s", p)
        barrier()

    history: list[dict[str, float]] = []
    status = "finished"
    if step_in_epoch >= steps_per_epoch:
        epoch, step_in_epoch = epoch + 1, 0
    try:
        if tc.max_steps and step >= tc.max_steps:  # restarted after reaching max_steps: nothing to do
            return _finish(cfg, method, run_dir, is_main, "max_steps", step, epoch, history)
        while epoch < tc.epochs:
            loader.set_epoch(epoch)
            method.train()
            if hooks.on_model:
                hooks.on_model(method)
            epoch_sums: dict[str, float] = {}
            epoch_steps = 0
            t_end = time.perf_counter()
            for batch in shield_workers(loader.iter_from(step_in_epoch)):
                t_start = time.perf_counter()
                momentum = momentum_at(step, total_steps, cfg.model.teacher_momentum)
                lr = lr_at(step, total_steps, warmup_steps, lr_peak, oc.min_lr)
                method.update_teacher(momentum)  # recipe: EMA before the step's forward pass
                set_lr(optimizer, lr)
                skipped = batch["skipped"].sum() if "skipped" in batch else torch.zeros((), dtype=torch.long)
                batch = _to_device(batch, env.device, tc.channels_last)
                ac = (torch.autocast(env.device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext())
                with ac:
                    out = model(batch)
                loss = out["loss"]
                if step == tc.debug_nan_at_step:  # test hook for the non-finite path
                    loss = loss * float("nan")
                    out = {**out, "loss": loss}
                names = list(out)
                local_stop = 1.0 if stop_requested() else 0.0
                vec = torch.stack([out[k].detach().float().reshape(()) for k in names]
                                  + [skipped.to(env.device).float(),
                                     torch.tensor(local_stop, device=env.device)])
                all_reduce(vec)
                vals = vec.tolist()  # the step's one host sync
                terms = {k: v / env.world_size for k, v in zip(names, vals)}
                for k, v in terms.items():
                    if not math.isfinite(v):
                        raise NonFiniteLossError(step, k, v)
                any_stop = vals[-1] > 0

                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if oc.clip_grad > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(method.parameters(), oc.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                t_done = time.perf_counter()

                row = {"step": step, "epoch": epoch, **terms, "lr": lr, "teacher_momentum": momentum,
                       "skipped": vals[-2]}
                history.append(row)
                step += 1
                step_in_epoch += 1
                epoch_steps += 1
                for k, v in terms.items():
                    epoch_sums[k] = epoch_sums.get(k, 0.0) + v
                epoch_sums["skipped"] = epoch_sums.get("skipped", 0.0) + vals[-2]
                if hooks.on_step:
                    hooks.on_step(step - 1, row)
                if is_main:
                    metrics.write(row)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{terms['loss']:.4f}", lr=f"{lr:.3g}", refresh=False)
                    if cfg.log.every_steps and (step - 1) % cfg.log.every_steps == 0:
                        step_time = t_done - t_end
                        tb.scalars({**terms, "lr": lr, "teacher_momentum": momentum,
                                    "images_per_s": oc.batch_size / max(step_time, 1e-9),
                                    "time_data_s": t_start - t_end, "time_compute_s": t_done - t_start,
                                    "memory_mb": memory_mb(env.device)}, step - 1)
                        log.info("epoch %d step %d/%d  %s  lr %.4g  m %.5f", epoch, step - 1, total_steps,
                                 "  ".join(f"{k} {v:.4f}" for k, v in terms.items()), lr, momentum)
                    if cfg.log.image_every_steps and (step - 1) % cfg.log.image_every_steps == 0:
                        tb.images("slots/view1_then_view2", slot_picture(method, batch, cfg.log.num_images), step - 1)
                        method.train()
                        if hooks.on_model:
                            hooks.on_model(method)

                should_stop = any_stop if env.distributed else stop_requested()
                reached_max = bool(tc.max_steps) and step >= tc.max_steps
                epoch_done = step_in_epoch >= steps_per_epoch
                if epoch_done:
                    break
                if should_stop or reached_max or (tc.checkpoint_every_steps and step % tc.checkpoint_every_steps == 0):
                    save()
                if should_stop:
                    log.warning("stop requested (%s): checkpoint saved at step %d; exiting", stop_reason() or
                                "another rank", step)
                    return TrainResult("preempted", step, epoch, run_dir, history)
                if reached_max:
                    return _finish(cfg, method, run_dir, is_main, "max_steps", step, epoch, history)
                t_end = time.perf_counter()

            # ---- epoch end (also reached right after a resume at an epoch boundary) ----
            if epoch_steps:
                n = max(epoch_steps, 1)
                summary = {k: v / n for k, v in epoch_sums.items() if k != "skipped"}
                skipped_total = int(epoch_sums.get("skipped", 0.0))
                log.info("epoch %d done: %s | skipped bad images %d (this rank's loader total %d)", epoch,
                         "  ".join(f"{k} {v:.4f}" for k, v in summary.items()), skipped_total,
                         getattr(loader, "bad_images", 0))
                tb.scalars({**summary, "skipped_images": skipped_total}, epoch, prefix="epoch/")
                tb.flush()
            epoch, step_in_epoch = epoch + 1, 0
            save()
            should_stop = stop_requested() if not env.distributed else _agree_stop()
            if should_stop and epoch < tc.epochs:
                log.warning("stop requested (%s) at the end of epoch %d; exiting", stop_reason(), epoch - 1)
                return TrainResult("preempted", step, epoch, run_dir, history)
            if tc.max_steps and step >= tc.max_steps:
                return _finish(cfg, method, run_dir, is_main, "max_steps", step, epoch, history)
        return _finish(cfg, method, run_dir, is_main, status, step, epoch, history)
    finally:
        _close_loader(loader)
        if bar is not None:
            bar.close()
        tb.close()
        metrics.close()


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


def _agree_stop() -> bool:
    flag = torch.tensor([1.0 if stop_requested() else 0.0])
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        flag = flag.cuda()
    return all_reduce(flag).item() > 0


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


def _finish(cfg: PretrainConfig, method: nn.Module, run_dir: Path, is_main: bool, status: str, step: int,
            epoch: int, history: list) -> TrainResult:
    if is_main and cfg.train.export_backbone:
        p = ckpt_io.export_backbone(method.teacher_backbone(), cfg.model.arch, run_dir / "teacher_backbone.pth",
                                    ckpt_io.encoder_variant(to_dict(cfg)["model"]))
        log.info("exported teacher backbone to %s", p)
    barrier()
    log.info("training %s at step %d (epoch %d)", status, step, epoch)
    return TrainResult(status, step, epoch, run_dir, history)


__all__ = ["NonFiniteLossError", "TrainHooks", "TrainResult", "resolve_run_dir", "seed_everything", "fit"]
