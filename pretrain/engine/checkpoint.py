"""Checkpoints: atomic writes, pruning, newest-usable resume, quarantine, RNG state, backbone export.

A checkpoint is a dict of tensors and primitive types only, so it loads with
``torch.load(weights_only=True)`` (docs/contracts.md):
``{"model", "optimizer", "scaler", "step", "epoch", "step_in_epoch", "rng", "config", "run_id"}``.
Files are ``checkpoints/ckpt_<step:08d>.pth`` in the run directory.

What the functions here guarantee, whatever else lies in the folder:

* a write is atomic (temporary file ``.<name>.tmp.<pid>``, fsync, rename); a failed write (disk full)
  raises :class:`CheckpointWriteError`, removes its temporary file and leaves older checkpoints intact;
* nothing holding NaN/Inf is written (:class:`NonFiniteStateError`);
* :func:`prune` deletes only checkpoints that load and carry this run's id (``run_id``, see
  :mod:`pretrain.engine.rundir`): files that do not load, files of another run and files written
  before run ids existed are never deleted and never count towards ``keep_last``, so the newest
  usable checkpoint of the run always survives;
* :func:`find_latest` returns the newest checkpoint that loads, belongs to the run and passes the
  caller's fit check; every other one is skipped with a warning naming it and why.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import random
import re
import shutil
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger("pretrain")

_NAME = re.compile(r"^ckpt_(\d{8,})\.pth$")
#: Temporary files of :func:`atomic_save`: ``.<final name>.tmp.<writer pid>``.
TEMP_NAME = re.compile(r"^\.(?P<name>.+\.pth)\.tmp\.(?P<pid>\d+)$")
#: Name of the file in the run directory that records the run's id (written at its first start).
RUN_ID_FILE = "run_id"
#: Sub-folder of ``checkpoints/`` that checkpoints taken before a blow-up are moved into.
QUARANTINE = "quarantine"
_REQUIRED = {"model", "optimizer", "step", "epoch", "step_in_epoch"}


class CheckpointWriteError(OSError):
    """Writing a file failed (typically a full disk); the temporary file is gone, older files are intact."""


class NonFiniteError(RuntimeError):
    """Training produced NaN/Inf (a loss term, or a weight/optimizer tensor about to be saved).

    ``step`` is the number of optimiser steps done when it was seen: every checkpoint of ``step`` or
    later is suspect. ``outcome`` says what happened to the checkpoints (the trainer fills it in:
    which were quarantined, which one a rerun resumes from).
    """

    hint = "lower optim.base_lr, check the data, or try train.amp=none"

    def __init__(self, step: int, what: str) -> None:
        super().__init__(what)
        self.step, self.what = step, what
        self.outcome = "the checkpoints before it are kept"

    def __str__(self) -> str:
        return f"{self.what}; {self.outcome} ({self.hint})"


class NonFiniteStateError(NonFiniteError):
    """A tensor of the state to be checkpointed holds NaN/Inf: the checkpoint is not written."""

    def __init__(self, step: int, tensor: str) -> None:
        super().__init__(step, f"non-finite weights after step {step - 1}: '{tensor}' holds NaN/Inf; "
                               f"checkpoint of step {step} not written")
        self.tensor = tensor


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _write_error(path: Path, err: BaseException) -> CheckpointWriteError:
    free = _free_bytes(path.parent)
    code = getattr(err, "errno", None)
    full = code in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < 64 * 2**20)
    what = "the disk is full (or the quota is used up)" if full else "the write failed"
    free_text = f"{free} bytes free" if free is not None else "free space unknown"
    return CheckpointWriteError(
        code or errno.EIO,
        f"could not write {path}: {what} ({type(err).__name__}: {err}); {free_text} on the file system of "
        f"{path.parent} (shutil.disk_usage); the partial file was removed and the older files in "
        f"{path.parent} are intact. Free some space (or point train.run_dir elsewhere) and rerun the same "
        f"command to resume")


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``.<name>.tmp.<pid>`` in the same directory, flush, fsync, rename.

    A crash mid-write leaves the previous file (or none), never a truncated one under ``path``.

    Raises:
        CheckpointWriteError: the write failed (``ENOSPC``, ``EDQUOT``, I/O error, or the
            ``RuntimeError`` torch's zip writer raises when its stream fails); the message says
            where, the free bytes there and that older files are intact. The temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:
            # Remove the partial file first: on a full disk its bytes are what the user needs back.
            tmp.unlink(missing_ok=True)
            raise _write_error(path, e) from e
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    finally:
        if tmp.exists():
            tmp.unlink()


def clean_temp_files(directory: str | Path, any_writer: bool = False) -> list[Path]:
    """Remove temporary files that interrupted :func:`atomic_save` calls left in ``directory``.

    Only names of the form ``.<name>.pth.tmp.<pid>`` are touched. With ``any_writer=False`` only those
    whose writer pid is not alive on this host; with ``any_writer=True`` all of them, which is safe
    only while the caller holds the run directory's lock (no other process writes there, and a pid
    seen from another host says nothing). Returns the removed paths.
    """
    d = Path(directory)
    removed: list[Path] = []
    if not d.is_dir():
        return removed
    for p in d.iterdir():
        m = TEMP_NAME.match(p.name)
        if m is None or not p.is_file():
            continue
        if not any_writer and _pid_alive(int(m.group("pid"))):
            continue
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    if removed:
        log.info("removed %d temporary file(s) of interrupted writes in %s: %s", len(removed), d,
                 ", ".join(p.name for p in removed))
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def first_non_finite(tree: Any, prefix: str = "") -> str | None:
    """The dotted name of the first tensor (or float) in a nested dict/list holding NaN/Inf, else ``None``.

    One ``isfinite().all()`` per floating tensor, reduced on the tensors' device with a single host
    sync per device, so a checkpoint of a ResNet-50 and its optimiser costs milliseconds on a GPU.
    """
    names: list[str] = []
    flags: list[torch.Tensor] = []
    scalars: list[str] = []

    def walk(node: Any, name: str) -> None:
        if isinstance(node, torch.Tensor):
            if node.is_floating_point() or node.is_complex():
                names.append(name)
                flags.append(torch.isfinite(node.detach()).all())
        elif isinstance(node, float):
            if not math.isfinite(node):
                scalars.append(name)
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{name}.{i}" if name else str(i))

    walk(tree, prefix)
    bad: list[str] = []
    by_device: dict[torch.device, list[int]] = {}
    for i, f in enumerate(flags):
        by_device.setdefault(f.device, []).append(i)
    for idx in by_device.values():
        ok = torch.stack([flags[i] for i in idx]).cpu()
        bad += [names[i] for i, good in zip(idx, ok.tolist()) if not good]
    order = {n: i for i, n in enumerate(names)}
    bad.sort(key=order.__getitem__)
    return bad[0] if bad else (scalars[0] if scalars else None)


def rng_state() -> dict:
    """Python, NumPy, torch (CPU and CUDA) RNG states as tensors/primitives (weights_only-safe)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_version": int(py_version),
        "python_gauss": py_gauss,
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos), "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss),
        "numpy_name": str(np_name),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    random.setstate((state["python_version"], tuple(int(x) for x in state["python"].tolist()), state["python_gauss"]))
    np.random.set_state((state["numpy_name"], state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def checkpoint_path(ckpt_dir: str | Path, step: int) -> Path:
    """``ckpt_dir/ckpt_<step:08d>.pth``."""
    return Path(ckpt_dir) / f"ckpt_{step:08d}.pth"


def step_of(path: str | Path) -> int:
    """The step number in a checkpoint's file name."""
    m = _NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not named ckpt_<step>.pth")
    return int(m.group(1))


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Checkpoint files of a folder (not its sub-folders), newest (highest step) first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found, reverse=True)]


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """Load a checkpoint on CPU with ``weights_only=True``; raises on a missing key.

    ``mmap=True`` maps the tensors instead of reading them (a cheap check that the file is whole and
    a way to read ``step``/``run_id``); files in torch's legacy format are then read in full.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as e:
        if not mmap or "mmap" not in str(e):
            raise
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise TypeError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a dict")
    missing = _REQUIRED - set(ckpt)
    if missing:
        raise KeyError(f"checkpoint {path} lacks {sorted(missing)}")
    return ckpt


def read_run_id(run_dir: str | Path) -> str | None:
    """The id recorded in ``run_dir/run_id`` (``None`` where there is none)."""
    p = Path(run_dir) / RUN_ID_FILE
    try:
        text = p.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return text or None


def belongs(ckpt: dict, run_id: str | None) -> bool:
    """Whether a loaded checkpoint is the run's: same ``run_id``; any checkpoint when ``run_id`` is ``None``;
    a checkpoint without one (written before run ids existed) is accepted for resuming."""
    theirs = ckpt.get("run_id")
    return run_id is None or theirs is None or theirs == run_id


_AUTO = "auto"


def _resolve_run_id(ckpt_dir: Path, run_id: str | None) -> str | None:
    return read_run_id(ckpt_dir.parent) if run_id == _AUTO else run_id


#: ``check(state) -> None`` when a loaded checkpoint is usable, else a one-line reason.
FitCheck = Callable[[dict], "str | None"]


def find_latest(ckpt_dir: str | Path, run_id: str | None = _AUTO,
                check: FitCheck | None = None, skip: Collection[Path] = ()) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads, belongs to the run and passes ``check``; the others are skipped, loudly.

    Args:
        ckpt_dir: a ``checkpoints/`` folder.
        run_id: the run's id; ``"auto"`` (default) reads it from the run directory (``ckpt_dir``'s
            parent) where one is recorded; ``None`` accepts checkpoints of any run.
        check: called with each loaded checkpoint; a returned reason (architecture, missing teacher,
            NaN/Inf) skips it with a warning naming the file and the reason.
        skip: files not to consider (another rank of the job cannot read them).
    """
    ckpt_dir = Path(ckpt_dir)
    run_id = _resolve_run_id(ckpt_dir, run_id)
    for path in list_checkpoints(ckpt_dir):
        if path in skip:
            continue
        try:
            state = load_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, loudly
            log.warning("skipping unreadable checkpoint %s: %s: %s", path, type(e).__name__, e)
            continue
        if not belongs(state, run_id):
            log.warning("skipping checkpoint %s: it belongs to another run (run id %s; this run is %s)", path,
                        state.get("run_id"), run_id)
            continue
        reason = check(state) if check is not None else None
        if reason:
            log.warning("skipping checkpoint %s: it does not fit this run: %s", path, reason)
            continue
        return path, state
    return None


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`scan` learns about one checkpoint file without reading its tensors."""

    path: Path
    step: int  # from the file name
    loads: bool
    run_id: str | None = None


def scan(ckpt_dir: str | Path) -> list[CheckpointInfo]:
    """Every checkpoint file of a folder, newest first, probed with a memory-mapped load."""
    out = []
    for p in list_checkpoints(ckpt_dir):
        try:
            state = load_checkpoint(p, mmap=True)
            out.append(CheckpointInfo(p, step_of(p), True, state.get("run_id")))
        except Exception:  # noqa: BLE001 - an unreadable file is reported as such
            out.append(CheckpointInfo(p, step_of(p), False))
    return out


def prune(ckpt_dir: str | Path, keep_last: int, run_id: str | None = None, keep: Iterable[Path] = ()) -> list[Path]:
    """Delete this run's checkpoints beyond its ``keep_last`` newest usable ones; returns the deleted paths.

    Only files that load and carry ``run_id`` are counted and deleted (any file that loads when
    ``run_id`` is ``None``): a truncated newer file, another run's file or one without a run id can
    never push the run's newest usable checkpoint out. ``keep`` names further files to keep.
    """
    keep = {Path(p).resolve() for p in keep}
    own = [c for c in scan(ckpt_dir) if c.loads and (run_id is None or c.run_id == run_id)]
    deleted = []
    for c in own[keep_last:]:
        if c.path.resolve() in keep:
            continue
        c.path.unlink(missing_ok=True)
        deleted.append(c.path)
    return deleted


def save_checkpoint(ckpt_dir: str | Path, state: dict, keep_last: int, keep: Iterable[Path] = ()) -> Path:
    """Write ``state`` atomically as ``ckpt_<step>.pth`` and prune to ``keep_last`` (:func:`prune`).

    Raises:
        NonFiniteStateError: ``model``, ``optimizer`` or ``scaler`` holds NaN/Inf (nothing is written).
        CheckpointWriteError: the write failed (see :func:`atomic_save`).
    """
    bad = first_non_finite({k: state[k] for k in ("model", "optimizer", "scaler") if k in state})
    if bad is not None:
        raise NonFiniteStateError(int(state["step"]), bad)
    path = checkpoint_path(ckpt_dir, int(state["step"]))
    atomic_save(state, path)
    prune(ckpt_dir, keep_last, state.get("run_id"), keep=[path, *keep])
    return path


def quarantine(ckpt_dir: str | Path, from_step: int, run_id: str | None = None) -> list[Path]:
    """Move the run's checkpoints of step ``from_step`` or later into ``ckpt_dir/quarantine/`` (never deleted).

    Used after a NaN/Inf: those checkpoints were taken after the update that blew up (or right before
    the step that did), so a rerun must not resume from them. Files that do not load or belong to
    another run stay where they are. Returns the new paths.
    """
    ckpt_dir = Path(ckpt_dir)
    moved = []
    for c in scan(ckpt_dir):
        if c.step < from_step or not c.loads or (run_id is not None and c.run_id not in (None, run_id)):
            continue
        dest_dir = ckpt_dir / QUARANTINE
        dest_dir.mkdir(exist_ok=True)
        dest = dest_dir / c.path.name
        n = 1
        while dest.exists():  # an earlier blow-up at the same step: keep both
            dest = dest_dir / f"{c.path.name}.{n}"
            n += 1
        os.replace(c.path, dest)
        moved.append(dest)
    return moved


def fit_problems(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> str | None:
    """Why a loaded checkpoint cannot be loaded into ``model`` (and ``optimizer``), or ``None``.

    Checked before anything is loaded (``load_state_dict`` copies tensor by tensor and raises only at
    the end, leaving a half-loaded model behind): the model's keys and shapes (another architecture,
    a file without the teacher), the optimiser's parameter groups and its per-parameter state shapes,
    and NaN/Inf anywhere in the weights or optimiser state.
    """
    sd = state.get("model")
    if not isinstance(sd, dict):
        return "'model' is not a state dict"
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in sd and isinstance(sd[k], torch.Tensor) and tuple(sd[k].shape) != tuple(v.shape)]
    problems = []

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

    if missing:
        problems.append(f"{len(missing)} model key(s) missing ({some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected model key(s) ({some(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es) (checkpoint vs this run: {some(shapes)})")
    if optimizer is not None and not problems:
        problems += _optimizer_problems(state.get("optimizer"), optimizer)
    if not problems:
        bad = first_non_finite({k: state[k] for k in ("model", "optimizer") if k in state})
        if bad is not None:
            problems.append(f"'{bad}' holds NaN/Inf")
    return "; ".join(problems) or None


def _optimizer_problems(saved: Any, optimizer: torch.optim.Optimizer) -> list[str]:
    if not isinstance(saved, dict) or "param_groups" not in saved:
        return ["'optimizer' is not an optimiser state dict"]
    groups, ours = saved["param_groups"], optimizer.param_groups
    if len(groups) != len(ours):
        return [f"optimizer has {len(groups)} parameter group(s), this run {len(ours)}"]
    sizes = [(len(g["params"]), len(o["params"])) for g, o in zip(groups, ours)]
    if any(a != b for a, b in sizes):
        return [f"optimizer parameter groups hold {[a for a, _ in sizes]} tensors, this run's {[b for _, b in sizes]}"]
    params = {i: p for g, o in zip(groups, ours) for i, p in zip(g["params"], o["params"])}
    bad = []
    for i, st in saved.get("state", {}).items():
        p = params.get(i)
        for name, v in st.items() if p is not None else ():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(p.shape):
                bad.append(f"state {i}.{name} {tuple(v.shape)} vs {tuple(p.shape)}")
    return [f"optimizer state shape mismatch ({', '.join(bad[:3])})"] if bad else []


def encoder_variant(model_cfg: dict) -> dict:
    """The encoder options a transfer target must rebuild (a checkpoint config's ``model`` section)."""
    return {"stem_pool": bool(model_cfg.get("stem_pool", True)), "last_stride": int(model_cfg.get("last_stride", 2))}


def export_backbone(backbone: nn.Module, arch: str, path: str | Path, encoder: dict | None = None) -> Path:
    """Write ``{"backbone": state_dict, "arch": arch, "encoder": {...}}`` (torchvision ResNet key names, no fc).

    ``encoder`` (:func:`encoder_variant`) records options such as ``stem_pool`` that change the network
    built from the same keys; the converters carry it to Detectron2 and MMSegmentation.
    """
    sd = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    record = {"backbone": sd, "arch": arch}
    if encoder is not None:
        record["encoder"] = dict(encoder)
    atomic_save(record, path)
    return Path(path)


def export_teacher_backbone(checkpoint: str | Path, out: str | Path, random_init: bool = False) -> Path:
    """Tool function: extract the teacher encoder from a training checkpoint (or a run directory).

    Keys under ``teacher_encoder.`` of ``model`` become the backbone state dict; the arch and encoder
    variant are read from the checkpoint's config. ``random_init=True`` exports the same encoder as the
    run initialised it (its ``train.seed``), before any training: the random-init baseline of a transfer
    comparison that differs from the pretrained backbone in nothing but the training.
    """
    if random_init:
        from pretrain.eval.inference import load_method

        method, cfg = load_method(checkpoint, torch.device("cpu"), random_init=True)
        model_cfg = cfg.get("model", {})
        return export_backbone(method.teacher_backbone(), model_cfg.get("arch", "unknown"), out,
                               encoder_variant(model_cfg))
    from pretrain.eval.inference import resolve_checkpoint

    checkpoint = resolve_checkpoint(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    prefix = "teacher_encoder."
    sd = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not sd:
        raise KeyError(f"checkpoint {checkpoint} has no '{prefix}*' keys in 'model'")
    model_cfg = ckpt.get("config", {}).get("model", {})
    atomic_save({"backbone": sd, "arch": model_cfg.get("arch", "unknown"), "encoder": encoder_variant(model_cfg)}, out)
    return Path(out)


__all__ = ["TEMP_NAME", "RUN_ID_FILE", "QUARANTINE", "CheckpointWriteError", "NonFiniteError", "NonFiniteStateError",
           "atomic_save", "clean_temp_files", "first_non_finite", "rng_state", "set_rng_state", "checkpoint_path",
           "step_of", "list_checkpoints", "load_checkpoint", "read_run_id", "belongs", "find_latest", "CheckpointInfo",
           "scan", "prune", "save_checkpoint", "quarantine", "fit_problems", "encoder_variant", "export_backbone",
           "export_teacher_backbone"]


def _main(argv: list[str] | None = None) -> int:
    """``python -m pretrain.engine.checkpoint CKPT OUT [--random-init]``: export the teacher backbone of a checkpoint."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m pretrain.engine.checkpoint", description=_main.__doc__)
    p.add_argument("checkpoint", help="a training checkpoint (runs/<name>/checkpoints/ckpt_*.pth) or a run directory")
    p.add_argument("out", help="output file, e.g. teacher_backbone.pth")
    p.add_argument("--random-init", action="store_true",
                   help="export the encoder as the run initialised it (the random-init transfer baseline)")
    a = p.parse_args(argv)
    print(export_teacher_backbone(a.checkpoint, a.out, random_init=a.random_init))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
