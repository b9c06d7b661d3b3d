"""Stop signals: flag handling, Ctrl-C twice, and children forked with the signals blocked survive them."""
from __future__ import annotations

import os
import signal
import time

import pytest

from pretrain.engine import signals as sig


def test_sigterm_sigusr1_and_sigint_request_a_stop():
    previous = sig.install_handlers()
    try:
        for s, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGUSR1, "SIGUSR1"), (signal.SIGINT, "SIGINT")):
            sig.clear_stop()
            assert not sig.stop_requested()
            os.kill(os.getpid(), s)
            time.sleep(0.05)  # the Python-level handler runs between bytecodes
            assert sig.stop_requested() and sig.stop_reason() == name
    finally:
        sig.restore_handlers(previous)
        sig.clear_stop()
    assert signal.getsignal(signal.SIGTERM) == previous[signal.SIGTERM]
    assert signal.getsignal(signal.SIGINT) == previous[signal.SIGINT]


def test_second_ctrl_c_raises_keyboard_interrupt(capsys):
    previous = sig.install_handlers()
    try:
        sig.clear_stop()
        sig.request_stop("SIGTERM")  # another signal first: a Ctrl-C after it is still a first Ctrl-C
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert sig.stop_reason() == "SIGINT"
        assert "press Ctrl-C again to exit at once" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)  # interrupted by the handler
    finally:
        sig.restore_handlers(previous)
        sig.clear_stop()


def test_request_stop_and_exit_codes():
    sig.request_stop("preempted by test")
    assert sig.stop_requested() and sig.stop_reason() == "preempted by test"
    sig.clear_stop()
    assert (sig.EXIT_OK, sig.EXIT_CONFIG, sig.EXIT_NONFINITE, sig.EXIT_PREEMPTED) == (0, 64, 65, 75)
    assert (sig.EXIT_RESUME_REFUSED, sig.EXIT_LOCKED, sig.EXIT_WRITE_FAILED, sig.EXIT_INTERRUPTED) == (64, 73, 74, 130)


def _fork_child(blocked: bool) -> int:
    """A child that, like a DataLoader worker, would die on SIGTERM (default action); exits 7 otherwise."""
    def child():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(0.5)
        os._exit(7)

    if blocked:
        with sig.signals_blocked():
            pid = os.fork()
            if pid == 0:
                child()
    else:
        pid = os.fork()
        if pid == 0:
            child()
    time.sleep(0.1)
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    return status


def test_child_forked_with_signals_blocked_survives_sigterm():
    blocked = _fork_child(True)
    assert os.WIFEXITED(blocked) and os.WEXITSTATUS(blocked) == 7
    unblocked = _fork_child(False)  # the control: without the mask it dies
    assert os.WIFSIGNALED(unblocked) and os.WTERMSIG(unblocked) == signal.SIGTERM
    # the mask is restored in this process afterwards
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_shield_workers_yields_everything_and_restores_mask():
    seen = []
    for x in sig.shield_workers(iter(range(5))):
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # unblocked while training
        seen.append(x)
    assert seen == [0, 1, 2, 3, 4]
