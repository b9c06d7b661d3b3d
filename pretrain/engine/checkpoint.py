"""Checkpoints: atomic writes, keep-last-k, newest-loadable resume, RNG state, backbone export.

A checkpoint is a dict of tensors and primitive types only, so it loads with
``torch.load(weights_only=True)`` (docs/contracts.md):
``{"model", "optimizer", "scaler", "step", "epoch", "step_in_epoch", "rng", "config"}``.
Files are ``checkpoints/ckpt_<step:08d>.pth`` in the run directory.
"""
from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger("pretrain")

_NAME = re.compile(r"^ckpt_(\d{8,})\.pth$")


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same directory, flush, fsync, rename.

    A crash mid-write leaves the previous file (or none), never a truncated one under ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    finally:
        if tmp.exists():
            tmp.unlink()


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
    return Path(ckpt_dir) / f"ckpt_{step:08d}.pth"


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Checkpoint files of a run, newest (highest step) first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint on CPU with ``weights_only=True``; raises on a missing key."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    missing = {"model", "optimizer", "step", "epoch", "step_in_epoch"} - set(ckpt)
    if missing:
        raise KeyError(f"checkpoint {path} lacks {sorted(missing)}")
    return ckpt


def find_latest(ckpt_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads; truncated or corrupt ones are skipped with a warning."""
    for path in list_checkpoints(ckpt_dir):
        try:
            return path, load_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, loudly
            log.warning("skipping unreadable checkpoint %s: %s: %s", path, type(e).__name__, e)
    return None


def prune(ckpt_dir: str | Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest checkpoints."""
    for old in list_checkpoints(ckpt_dir)[keep_last:]:
        old.unlink(missing_ok=True)


def save_checkpoint(ckpt_dir: str | Path, state: dict, keep_last: int) -> Path:
    """Write ``state`` atomically as ``ckpt_<step>.pth`` and prune to ``keep_last``."""
    path = checkpoint_path(ckpt_dir, int(state["step"]))
    atomic_save(state, path)
    prune(ckpt_dir, keep_last)
    return path


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


__all__ = ["atomic_save", "rng_state", "set_rng_state", "checkpoint_path", "list_checkpoints", "load_checkpoint",
           "find_latest", "prune", "save_checkpoint", "encoder_variant", "export_backbone", "export_teacher_backbone"]


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
