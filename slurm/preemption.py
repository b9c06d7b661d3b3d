"""Preemption and time limits of a submitit job, coordinated with the engine's graceful stop.

What happens, and why it is not submitit's default path:

* SLURM sends ``USR2`` (``#SBATCH --signal=USR2@<delay>``, submitit's ``JobEnvironment.USR_SIG``)
  to **every task** before the time limit (and on preemption where the site sends the job's
  signal). submitit's own handler calls ``checkpoint()`` inside the signal handler of rank 0
  only, then requeues and ``sys.exit``s at once: in a training loop that would exit in the middle
  of a step, before any checkpoint is written, and the other ranks would hang in a collective.
* So :func:`install` replaces that handler on every rank with one that only calls the engine's
  :func:`pretrain.engine.signals.request_stop`. The trainer all-reduces the flag after each step,
  so all ranks stop after the **same** step; rank 0 writes the checkpoint and the trainer returns
  ``EXIT_PREEMPTED``.
* Then :func:`requeue` (rank 0) does what submitit's handler does, at a safe point: it calls the
  job's ``checkpoint()`` (which returns a ``DelayedSubmission`` of itself, or ``None`` once the
  requeue budget is spent), dumps it as the job's submitted pickle and requeues the job through
  the job environment (``scontrol requeue`` on SLURM, exit code 144 for the local executor).
  The requeued job runs the same callable; the engine's auto-resume finds the checkpoint.
* ``SIGTERM`` (``scontrol requeue`` by an admin, preemption with ``PreemptMode=REQUEUE``,
  ``scancel``) is the engine's own stop signal: it checkpoints and exits; SLURM itself decides
  whether the job comes back, so nothing is requeued from inside.
"""
from __future__ import annotations

import logging
import signal
import sys

import submitit
from submitit.core import utils as submitit_utils
from submitit.core.job_environment import JobEnvironment

log = logging.getLogger(__name__)


class PreemptionState:
    """Which stop signals this process has received."""

    def __init__(self) -> None:
        self.requeue_signal = False  # USR2: time limit / preemption -> we requeue ourselves
        self.names: list[str] = []


STATE = PreemptionState()


def usr_signal() -> int:
    """The signal SLURM sends before the time limit: submitit's ``USR_SIG`` (USR2 unless overridden)."""
    return JobEnvironment._usr_sig()


def _on_usr(signum, _frame) -> None:
    from pretrain.engine.signals import request_stop

    STATE.requeue_signal = True
    STATE.names.append(signal.Signals(signum).name)
    request_stop(f"{signal.Signals(signum).name} (time limit / preemption)")


def install() -> None:
    """Route submitit's requeue signal to the engine's graceful stop on this rank (main thread)."""
    signal.signal(usr_signal(), _on_usr)


def requeue(job, env: submitit.JobEnvironment) -> None:
    """Rank 0 after the checkpoint is on disk: dump ``job.checkpoint()`` and requeue; never returns.

    Raises ``submitit.core.utils.UncompletedJobError`` (the job fails with that message, the
    checkpoint stays on disk) when ``job.checkpoint()`` returns ``None``: the requeue budget is spent.
    """
    paths = env.paths
    delayed = job.checkpoint()
    if delayed is None:
        raise submitit_utils.UncompletedJobError(
            f"job {env.job_id} was interrupted {job.requeues} times, the limit (--max-requeues "
            f"{job.max_requeues}); not requeued. The last checkpoint is in {job.run_dir_of(env)}: "
            f"resubmit with --run-dir to continue")
    previous = submitit_utils.DelayedSubmission.load(paths.submitted_pickle)
    delayed.set_timeout(previous._timeout_min, previous._timeout_countdown)
    with submitit_utils.temporary_save_path(paths.submitted_pickle) as tmp:
        delayed.dump(tmp)
    log.warning("requeueing job %s (%d of at most %d requeues)", env.job_id, job.requeues, job.max_requeues)
    env._requeue(job.max_requeues - job.requeues)
    sys.exit(-1)  # as submitit does after a requeue: no result pickle, the requeued run writes it
