"""Entry point of ``python -m pretrain``: parse, set up distributed, train, map outcomes to exit codes.

Usage::

    python -m pretrain configs/pretrain/demo_cpu.yaml [key=value ...]
    torchrun --nproc_per_node 8 -m pretrain configs/pretrain/slotcon_coco_r50_800ep.yaml train.output_dir=/ckpt
    srun python -m pretrain configs/...yaml        # SLURM variables are read directly

Exit codes (``pretrain.engine.signals``):

* 0: finished (or ``train.max_steps`` reached);
* 64: bad config/command line, or a resume refused: ``train.resume=<path>`` that does not load or
  fit the model/optimiser, or a checkpoint whose config differs in a key that changes the run's
  trajectory (the message lists them; ``train.allow_config_change=[...]`` allows them);
* 65: NaN/Inf in a loss term or in the weights about to be checkpointed; the checkpoints from that
  step on are moved to ``checkpoints/quarantine/`` and the message names the one a rerun resumes from.
  Also: more undecodable images than ``data.max_bad_fraction`` on any rank (every rank stops at the
  same step; the message of the rank that found them names examples);
* 73: the run directory is locked by another run (the message names its host and pid);
* 74: a checkpoint could not be written (disk full: the message gives the path and free bytes);
  the older checkpoints are intact;
* 75: stopped by SIGTERM/SIGUSR1/SIGINT (Ctrl-C) or :func:`request_checkpoint_and_exit` after
  writing a checkpoint: run the same command again to resume (``train.resume=auto``);
* 130: a second Ctrl-C: stopped at once, without a checkpoint of the interrupted step.

Programmatic use (the SLURM/submitit launcher): :func:`main` with an argv list, or :func:`run`
with a loaded config; :func:`request_checkpoint_and_exit` from a signal handler or another thread.
"""
from __future__ import annotations

import argparse
import logging
import sys

from pretrain.config import ConfigError, PretrainConfig, load_config
from pretrain.data.loader_base import TooManyBadImages
from pretrain.engine.distributed import cleanup, init_distributed
from pretrain.engine.checkpoint import CheckpointWriteError
from pretrain.engine.hooks import HookBase
from pretrain.engine.rundir import ResumeError, RunDirLocked
from pretrain.engine.signals import (EXIT_BAD_DATA, EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_LOCKED, EXIT_NONFINITE,
                                     EXIT_OK, EXIT_PREEMPTED, EXIT_RESUME_REFUSED, EXIT_WRITE_FAILED, clear_stop,
                                     install_handlers, request_stop, restore_handlers)
from pretrain.engine.trainer import NonFiniteError, TrainResult, fit

log = logging.getLogger("pretrain")


def request_checkpoint_and_exit(reason: str = "requested") -> None:
    """Make the running :func:`run` finish its step, save a checkpoint and return ``preempted``."""
    request_stop(reason)


def run(cfg: PretrainConfig, hooks: list[HookBase] | None = None) -> TrainResult:
    """Train ``cfg`` in this process (one rank of a job, or the only one); ``hooks`` run before the default ones.

    Initialises the process group from the environment when ``WORLD_SIZE > 1`` (and destroys it
    afterwards if it created it), installs the SIGTERM/SIGUSR1/SIGINT stop handlers while training.
    Raises what :func:`pretrain.engine.trainer.fit` raises; :func:`main` maps each to its exit code.
    """
    import torch.distributed as dist

    created = not (dist.is_available() and dist.is_initialized())
    previous = install_handlers()
    try:
        env = init_distributed(cfg.train.device)
        return fit(cfg, env, hooks)
    finally:
        clear_stop()  # a stop request ends this run only, never the next one in the same process
        restore_handlers(previous)
        if created:
            cleanup()


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    p = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML under configs/pretrain/ (omit to use the defaults)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.base_lr=0.5 train.amp=none")
    a = p.parse_args(argv)
    config = a.config
    overrides = list(a.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    return config, overrides


def main(argv: list[str] | None = None) -> int:
    """CLI: returns the process exit code (see the module docstring)."""
    config, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:  # only this: a Ctrl-C while loading is no second Ctrl-C of a run
        return report_error(e)
    try:
        result = run(cfg)
    except BaseException as e:  # noqa: BLE001 - the documented errors become exit codes, the rest propagate
        code = report_error(e)
        if code is None:
            raise
        return code
    return EXIT_PREEMPTED if result.status == "preempted" else EXIT_OK


#: Errors whose message goes to the run's log, and their exit codes.
_LOGGED_ERRORS = ((NonFiniteError, EXIT_NONFINITE), (TooManyBadImages, EXIT_BAD_DATA),
                  (ResumeError, EXIT_RESUME_REFUSED), (CheckpointWriteError, EXIT_WRITE_FAILED))


def report_error(e: BaseException) -> int | None:
    """Log the message of an error :func:`run` documents and return its exit code (``None``: not one of them,
    a bug whose traceback the caller must show). Shared by :func:`main` and the SLURM job."""
    for kind, code in _LOGGED_ERRORS:
        if isinstance(e, kind):
            log.error("%s", e)
            return code
    if isinstance(e, ConfigError):
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if isinstance(e, RunDirLocked):
        # stderr, not the logger: its file handler may still point at the holder's log.txt
        print(f"error: {e}", file=sys.stderr)
        return EXIT_LOCKED
    if isinstance(e, KeyboardInterrupt):
        log.error("interrupted by a second Ctrl-C: stopped without a checkpoint of the current step; "
                  "rerun the same command to resume from the last checkpoint")
        return EXIT_INTERRUPTED
    return None


__all__ = ["main", "run", "report_error", "request_checkpoint_and_exit", "parse_args"]
