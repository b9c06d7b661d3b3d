"""The submitit callable of a pretraining job (one instance per task, one task per GPU)."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import submitit

from slurm import preemption
from slurm.distenv import export_distributed_env

log = logging.getLogger(__name__)


class PretrainJob(submitit.helpers.Checkpointable):
    """Runs ``pretrain.train.run(load_config(config, [*overrides, train.run_dir=...]))`` in each task.

    Every task exports torch's env:// variables first (:func:`slurm.distenv.export_distributed_env`);
    the engine then joins the process group (NCCL on GPUs, gloo on CPU). See :mod:`slurm.preemption`
    for what happens on USR2 (time limit) and SIGTERM (preemption, ``scontrol requeue``).

    The run directory is ``<output_root>/<name>_<job id>`` (a requeued SLURM job keeps its id,
    hence its directory and checkpoints) unless ``run_dir`` is given (continue an older run).
    """

    def __init__(self, config: str, overrides: list[str], output_root: str, name: str,
                 max_requeues: int, run_dir: str | None = None) -> None:
        self.config = str(Path(config).resolve())
        self.overrides = list(overrides)
        self.output_root = str(Path(output_root).resolve())
        self.name = name
        self.max_requeues = max_requeues
        self.run_dir = str(Path(run_dir).resolve()) if run_dir else None
        self.requeues = 0

    def run_dir_of(self, env: submitit.JobEnvironment) -> Path:
        if self.run_dir:
            return Path(self.run_dir)
        # An array element's id "123_4" is fine in a path; the main job id is what the user sees.
        return Path(self.output_root) / f"{self.name}_{env.job_id}"

    def argv(self, run_dir: Path) -> list[str]:
        return [self.config, *self.overrides, f"train.run_dir={run_dir}", f"name={self.name}"]

    def __call__(self) -> dict:
        from pretrain.config import load_config
        from pretrain.engine.signals import EXIT_PREEMPTED
        from pretrain.train import report_error, run

        env = submitit.JobEnvironment()
        dist_env = export_distributed_env()
        preemption.install()
        run_dir = self.run_dir_of(env)
        log.info("job %s rank %d/%d on %s: run dir %s (requeues so far: %d)", env.job_id, dist_env.rank,
                 dist_env.world_size, env.hostname, run_dir, self.requeues)
        try:
            result = run(load_config(self.config, self.argv(run_dir)[1:]))
        except BaseException as e:  # noqa: BLE001 - documented errors: their message and exit code, not a traceback
            code = report_error(e)
            if code is None:
                raise
            # a non-zero task exit makes srun (--kill-on-bad-exit) end the other tasks at once
            log.error("rank %d exits with code %d (%s)", dist_env.rank, code, type(e).__name__)
            sys.exit(code)
        self._log_steps(run_dir, dist_env.rank, env.job_id, result)
        if result.status == "preempted":
            if preemption.STATE.requeue_signal:
                if dist_env.rank == 0:
                    preemption.requeue(self, env)  # exits (or raises once the budget is spent)
                sys.exit(0)  # other ranks: no result pickle; the requeued run writes the real one
            sys.exit(EXIT_PREEMPTED)  # SIGTERM: checkpoint written; SLURM requeues or cancels the job itself
        return {"run_dir": str(run_dir), "rank": dist_env.rank, "world_size": dist_env.world_size, "node": env.node,
                "status": result.status, "step": result.step, "epoch": result.epoch, "requeues": self.requeues}

    def _log_steps(self, run_dir: Path, rank: int, job_id: str, result) -> None:
        """Append this rank's steps to ``run_dir/ranks/rank<k>.jsonl`` (one line per step, every (re)start).

        The trainer's own metrics/TensorBoard come from rank 0 only; this per-rank record shows that
        every rank ran the same steps with the same (all-reduced) losses, across requeues.
        """
        d = run_dir / "ranks"
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"rank{rank}.jsonl", "a") as f:
            for row in result.history:
                f.write(json.dumps({"job_id": job_id, "requeues": self.requeues, **row}) + "\n")
            f.write(json.dumps({"job_id": job_id, "requeues": self.requeues, "end": result.status,
                                "step": result.step}) + "\n")

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission | None:
        """submitit's hook on the requeue signal: request a training checkpoint, resubmit ourselves.

        Asks the engine to save after the current step (every rank does through
        :mod:`slurm.preemption`; this covers a signal that reaches submitit's own handler first)
        and returns a ``DelayedSubmission`` of this callable with the requeue count raised, or
        ``None`` (no requeue) once ``max_requeues`` requeues were used.
        """
        from pretrain.engine.signals import request_stop

        request_stop("submitit checkpoint()")
        if self.requeues >= self.max_requeues:
            return None
        self.requeues += 1
        return super().checkpoint(*args, **kwargs)
