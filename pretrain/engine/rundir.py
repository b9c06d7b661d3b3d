"""The run directory as one run's property: its lock, its run id, and what a resume may change.

* **Lock.** Rank 0 holds ``fcntl.flock`` on ``run_dir/run.lock`` for the run's life; the file records
  the holder's host, pid and start time. A second run on the same directory stops with
  :class:`RunDirLocked` naming the holder (``python -m pretrain`` exits 73). The kernel drops the lock
  when the holder dies, so a killed run never blocks the next one; forked children (data-loader
  workers) close their copy at fork, so an orphaned worker cannot keep it either. Where the file
  system has no ``flock`` (some Lustre mounts), the run warns and continues unlocked.
* **Run id.** A random id is written to ``run_dir/run_id`` at the run's first start and into every
  checkpoint (``"run_id"``); pruning and resuming use it to tell this run's checkpoints from files
  dropped in from elsewhere (:mod:`pretrain.engine.checkpoint`). A run directory without the file
  adopts the id of its newest loadable checkpoint (or a new one).
* **``train.resume=none`` on a directory that holds a previous run** starts a new run with a new id:
  the previous run's ``checkpoints/``, ``metrics.jsonl``, ``tb/``, ``config.yaml`` and
  ``teacher_backbone.pth`` are moved, not deleted, to ``superseded/<old run id>-<time>/``, so the new
  run's checkpoints and metrics never interleave with the old ones and the old ones stay recoverable.
* **Config changes on resume.** :func:`config_changes` compares a checkpoint's stored config with the
  new one. Every key counts as changing the run's trajectory except :data:`FREE_KEYS` (where and how
  the run executes, logs and checkpoints); the trainer refuses a trajectory change unless
  ``train.allow_config_change`` lists the key (or its section).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain.engine import checkpoint as ckpt_io

log = logging.getLogger("pretrain")

LOCK_FILE = "run.lock"
SUPERSEDED = "superseded"
#: What ``train.resume=none`` moves aside when the directory holds a previous run.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tb", "config.yaml", "teacher_backbone.pth")

#: Config keys (or whole sections) that may change between a checkpoint and its resume: they decide where
#: and how the run executes, logs and checkpoints, not the sequence of weights it computes.
FREE_KEYS = frozenset({
    "name", "log", "eval",
    "data.root", "data.ffcv_path", "data.num_workers", "data.max_bad_fraction",
    "train.max_steps", "train.device", "train.amp", "train.channels_last", "train.compile", "train.deterministic",
    "train.checkpoint_every_steps", "train.keep_last", "train.output_dir", "train.run_dir", "train.resume",
    "train.export_backbone", "train.allow_config_change",
})


class RunDirLocked(RuntimeError):
    """Another process holds the run directory's lock."""


class ResumeError(RuntimeError):
    """The checkpoint to resume cannot be used as asked (named explicitly and does not fit, or the config
    changes the run's trajectory); ``python -m pretrain`` exits 64."""


# Lock fds this process holds; a forked child closes its copies so that only this process holds the lock.
_HELD_FDS: set[int] = set()


def _close_in_child() -> None:
    for fd in list(_HELD_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunDirLock:
    """``flock`` on ``run_dir/run.lock``, recording ``{"host", "pid", "started"}`` in the file.

    ``held`` tells whether the lock is really held (``False`` after :meth:`acquire` on a file system
    without ``flock``: the run then goes on unlocked, with a warning).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None
        self.held = False

    def acquire(self) -> RunDirLock:
        """Take the lock without waiting.

        Raises:
            RunDirLocked: another process holds it; the message names its host and pid.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = _read_holder(fd)
                os.close(fd)
                raise RunDirLocked(_locked_message(self.path, holder)) from None
            os.close(fd)
            log.warning("cannot lock %s (%s): this file system has no flock; the run goes on without a lock, "
                        "so make sure no other run uses this directory", self.path, e)
            return self
        self.fd, self.held = fd, True
        _HELD_FDS.add(fd)
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        return self

    def release(self) -> None:
        """Drop the lock (idempotent). The file stays: another run may already be waiting on it."""
        if self.fd is not None:
            _HELD_FDS.discard(self.fd)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
        self.fd, self.held = None, False


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _locked_message(path: Path, holder: dict) -> str:
    host, pid = holder.get("host", "?"), holder.get("pid", "?")
    since = f" since {holder['started']}" if "started" in holder else ""
    note = ""
    if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        note = f" (pid {pid} is no longer running here: a child process it started still holds the lock)"
    return (f"run directory {path.parent} is in use by another run: host {host}, pid {pid}{since}{note} "
            f"(lock file {path}). Wait for that run to end or stop it, or give this run another train.run_dir")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_run_dir(run_dir: str | Path, resume: str, exclusive: bool) -> str:
    """Rank 0, lock held: remove stale temporary files, move a previous run aside on ``resume=none``,
    and return the run's id (written to ``run_dir/run_id``).

    ``exclusive`` (the lock is really held) lets every temporary file go; without it only those
    whose writer pid is dead on this host.
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    for d in (run_dir, ckpt_dir):
        ckpt_io.clean_temp_files(d, any_writer=exclusive)
    run_id = ckpt_io.read_run_id(run_dir)
    if resume == "none":
        previous = [name for name in RUN_OUTPUTS if (run_dir / name).exists()
                    and not (name == "checkpoints" and not _has_files(run_dir / name))]
        if any(name in previous for name in ("checkpoints", "metrics.jsonl")):
            _move_aside(run_dir, previous, run_id or _newest_run_id(ckpt_dir) or "unknown")
        run_id = None  # a new run
    elif run_id is None:
        run_id = _newest_run_id(ckpt_dir)
        if run_id is not None:
            log.info("run dir %s had no %s: adopted the run id %s of its newest checkpoint", run_dir,
                     ckpt_io.RUN_ID_FILE, run_id)
    if run_id is None:
        run_id = uuid.uuid4().hex[:16]
    if ckpt_io.read_run_id(run_dir) != run_id:
        _write_text(run_dir / ckpt_io.RUN_ID_FILE, run_id + "\n")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    return run_id


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _has_files(d: Path) -> bool:
    return any(p.is_file() or _has_files(p) for p in d.iterdir()) if d.is_dir() else False


def _newest_run_id(ckpt_dir: Path) -> str | None:
    for c in ckpt_io.scan(ckpt_dir):
        if c.loads and c.run_id:
            return c.run_id
    return None


def _move_aside(run_dir: Path, names: list[str], old_id: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = run_dir / SUPERSEDED / f"{old_id}-{stamp}"
    n = 1
    while dest.exists():
        dest = run_dir / SUPERSEDED / f"{old_id}-{stamp}.{n}"
        n += 1
    dest.mkdir(parents=True)
    for name in names:
        shutil.move(str(run_dir / name), str(dest / name))
    log.warning("train.resume=none on %s, which holds a previous run (id %s): moved its %s to %s; this is a new run",
                run_dir, old_id, ", ".join(names), dest)
    return dest


@dataclass
class ConfigChanges:
    """Keys whose value differs between a checkpoint's config and the new one, as ``(key, old, new)``."""

    refused: list[tuple[str, Any, Any]] = field(default_factory=list)  # change the trajectory, not allowed
    allowed: list[tuple[str, Any, Any]] = field(default_factory=list)  # listed in train.allow_config_change
    free: list[tuple[str, Any, Any]] = field(default_factory=list)  # FREE_KEYS

    @staticmethod
    def describe(changes: list[tuple[str, Any, Any]]) -> str:
        """``key old -> new, ...``."""
        return ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _covered(key: str, names: frozenset[str] | set[str]) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:i]) in names for i in range(1, len(parts) + 1))


def config_changes(old: dict | None, new: dict, allowed: list[str] | tuple[str, ...] = (),
                   defaults: dict | None = None) -> ConfigChanges:
    """Compare a checkpoint's stored config (``old``) with the run's (``new``), both as :func:`to_dict` gives them.

    A key the old config lacks (added to the schema since) counts as its value in ``defaults`` (the
    schema's defaults), so a new key left at its default is no change. ``allowed`` holds keys or
    section names (``train.allow_config_change``). A checkpoint without a config compares as unchanged.
    """
    out = ConfigChanges()
    if not isinstance(old, dict):
        return out
    flat_old, flat_new = _flatten(old), _flatten(new)
    flat_default = _flatten(defaults) if defaults else {}
    allow = set(allowed)
    missing = object()
    for key, value in flat_new.items():
        before = flat_old.get(key, flat_default.get(key, missing))
        if before is missing or before == value:
            continue
        change = (key, before, value)
        if _covered(key, FREE_KEYS):
            out.free.append(change)
        elif _covered(key, allow):
            out.allowed.append(change)
        else:
            out.refused.append(change)
    return out


__all__ = ["LOCK_FILE", "SUPERSEDED", "RUN_OUTPUTS", "FREE_KEYS", "RunDirLocked", "ResumeError", "RunDirLock",
           "prepare_run_dir", "ConfigChanges", "config_changes"]
