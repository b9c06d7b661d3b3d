"""Graceful stop: SIGTERM / SIGUSR1 / SIGINT (or :func:`request_stop`) -> finish the step, checkpoint, exit.

The handler only sets a flag; the trainer checks it after each optimiser step (agreeing across
ranks through an all-reduce, so every rank stops after the same step), writes a checkpoint and
returns with :data:`EXIT_PREEMPTED`. SLURM sends SIGTERM before a preemption/time limit
(``--signal=USR1@90`` gives SIGUSR1 earlier); submitit's checkpoint hook calls :func:`request_stop`.

Ctrl-C (SIGINT) is the same request, so an interactive run loses nothing since its last checkpoint;
a second Ctrl-C raises ``KeyboardInterrupt`` at once (no checkpoint; ``python -m pretrain`` exits
:data:`EXIT_INTERRUPTED`), for when the step or the write itself is what hangs.
"""
from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

#: Process exit codes of ``python -m pretrain`` (sysexits.h values where one fits).
EXIT_OK = 0  # training finished
EXIT_CONFIG = 64  # EX_USAGE: bad config / command line
EXIT_RESUME_REFUSED = 64  # also EX_USAGE: the checkpoint to resume does not fit the config / changes its trajectory
EXIT_NONFINITE = 65  # EX_DATAERR: NaN/Inf; later checkpoints quarantined, the message names the resume point
EXIT_BAD_DATA = 65  # also EX_DATAERR: more undecodable images than data.max_bad_fraction on some rank
EXIT_LOCKED = 73  # EX_CANTCREAT: the run directory is locked by another run (the message names host and pid)
EXIT_WRITE_FAILED = 74  # EX_IOERR: a checkpoint could not be written (disk full); older ones are intact
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal after saving a checkpoint; re-run to resume
EXIT_INTERRUPTED = 130  # 128 + SIGINT: a second Ctrl-C, no checkpoint of the step it interrupted

#: The signals that request a checkpoint and a clean exit.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

_stop = threading.Event()
_received: list[str] = []


def request_stop(reason: str = "request_stop()") -> None:
    """Ask the running trainer to save a checkpoint after the current step and return (thread/signal safe)."""
    _received.append(reason)
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def stop_reason() -> str:
    return _received[-1] if _received else ""


def clear_stop() -> None:
    """Reset the flag (a new run in the same process starts clean)."""
    _stop.clear()
    _received.clear()


def _handler(signum, _frame) -> None:
    name = signal.Signals(signum).name
    if signum == signal.SIGINT:
        if "SIGINT" in _received:
            raise KeyboardInterrupt
        # Not the logger: a handler that takes its lock can deadlock against the interrupted code.
        sys.stderr.write("\nCtrl-C: finishing the step, then checkpointing and exiting "
                         "(press Ctrl-C again to exit at once, without a checkpoint)\n")
        sys.stderr.flush()
    request_stop(name)


def install_handlers(signals: tuple[int, ...] = STOP_SIGNALS) -> dict[int, object]:
    """Install the stop handler (main thread only); returns the previous handlers for :func:`restore_handlers`."""
    previous: dict[int, object] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for s in signals:
        previous[s] = signal.signal(s, _handler)
    return previous


def restore_handlers(previous: dict[int, object]) -> None:
    for s, h in previous.items():
        signal.signal(s, h)  # type: ignore[arg-type]


@contextmanager
def signals_blocked(signals: tuple[int, ...] = STOP_SIGNALS):
    """Block the stop signals in this thread; pending ones are delivered on exit.

    Processes forked meanwhile inherit the blocked mask. That is the point: SLURM signals every
    process of a job step, and PyTorch's DataLoader workers install a C handler that dies on
    SIGTERM, which the main process would then report as a crashed worker in the middle of its
    graceful stop. Workers forked with the signals blocked never act on them and still exit
    through the loader's own shutdown (done event, parent watchdog).
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def shield_workers(batches: Iterable) -> Iterator:
    """Iterate ``batches`` with the stop signals blocked inside each ``next()`` (where loader workers start)."""
    it = iter(batches)
    while True:
        with signals_blocked():
            try:
                item = next(it)
            except StopIteration:
                return
        yield item


__all__ = ["STOP_SIGNALS", "signals_blocked", "shield_workers", "EXIT_OK", "EXIT_CONFIG", "EXIT_RESUME_REFUSED",
           "EXIT_NONFINITE", "EXIT_LOCKED", "EXIT_WRITE_FAILED", "EXIT_PREEMPTED", "EXIT_INTERRUPTED", "request_stop",
           "stop_requested", "stop_reason", "clear_stop", "install_handlers", "restore_handlers"]
