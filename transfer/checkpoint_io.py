"""Read and verify the teacher encoder from a pretraining checkpoint (shared by both converters).

Two inputs are accepted (docs/contracts.md, "Checkpoints"):

* a full pretraining checkpoint ``{"model": method.state_dict(), ...}`` whose teacher encoder lives
  under the prefix ``teacher_encoder.`` (a DDP ``module.`` prefix in front is tolerated);
* an exported backbone ``{"backbone": state_dict, "arch": str}``.

The encoder must carry torchvision ResNet key names without ``fc``. Every key of the torchvision
ResNet of that depth must be present with the right shape, and nothing else may be there; the
BN ``num_batches_tracked`` counters are optional and dropped (they are bookkeeping, not weights).
SlotCon transfers the teacher encoder (SlotCon Sec. 4.2), which is why only that prefix is read.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torchvision

TEACHER_PREFIX = "teacher_encoder."

# Blocks per stage (layer1..layer4) and block type of each torchvision ResNet depth.
RESNET_LAYOUT: dict[str, tuple[tuple[int, int, int, int], bool]] = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet34": ((3, 4, 6, 3), False),
    "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True),
    "resnet152": ((3, 8, 36, 3), True),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and the reason."""


def depth_of(arch: str) -> int:
    """``"resnet50" -> 50``; raises CheckpointError for an arch that is not a known ResNet."""
    if arch not in RESNET_LAYOUT:
        raise CheckpointError(f"unknown architecture {arch!r}; known: {sorted(RESNET_LAYOUT)}")
    return int(arch[len("resnet"):])


def expected_resnet_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of torchvision's ``arch`` without ``fc`` and ``num_batches_tracked``.

    Built from torchvision's own constructor on the meta device (no memory, no weights).
    """
    depth_of(arch)
    with torch.device("meta"):
        model = getattr(torchvision.models, arch)(weights=None)
    return {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }


def infer_arch(state: dict[str, torch.Tensor]) -> str:
    """The torchvision ResNet depth whose layout (blocks per stage, bottleneck or not) ``state`` has."""
    bottleneck = any(k.startswith("layer1.0.conv3.") for k in state)
    blocks = []
    for stage in range(1, 5):
        idx = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{stage}.") and k.split(".")[1].isdigit()}
        blocks.append(max(idx) + 1 if idx else 0)
    for arch, (layout, is_bottleneck) in RESNET_LAYOUT.items():
        if tuple(blocks) == layout and bottleneck == is_bottleneck:
            return arch
    kind = "bottleneck" if bottleneck else "basic"
    raise CheckpointError(f"the encoder's layout ({kind} blocks per stage {blocks}) is no known ResNet")


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory resolves to its newest checkpoint that loads (the teacher's latest state); a file is itself."""
    path = Path(path)
    if path.is_dir():
        from pretrain.engine.checkpoint import find_latest

        found = find_latest(path / "checkpoints") if (path / "checkpoints").is_dir() else None
        if found is None:
            raise CheckpointError(f"{path} is a directory without a loadable checkpoint in {path / 'checkpoints'}")
        return found[0]
    return path


def _read(path: Path) -> object:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle / zip / runtime errors depending on the damage
        raise CheckpointError(
            f"cannot read checkpoint {path} with torch.load(weights_only=True): {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        ) from exc


def _strip_module(state: dict) -> dict:
    # A DDP-wrapped method saves every key under "module."; the contract's prefixes start after it.
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _config_arch(ckpt: dict) -> str | None:
    cfg = ckpt.get("config")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        arch = cfg["model"].get("arch")
        return arch if isinstance(arch, str) else None
    return None


def extract_teacher_encoder(ckpt: object, source: str = "<checkpoint>") -> tuple[dict[str, torch.Tensor], str | None]:
    """The raw teacher-encoder state dict of a loaded checkpoint and the arch it declares (if any)."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{source}: expected a dict checkpoint, got {type(ckpt).__name__}")
    if "backbone" in ckpt:
        state, arch = ckpt["backbone"], ckpt.get("arch")
        if not isinstance(state, dict):
            raise CheckpointError(f"{source}: 'backbone' is not a state dict")
        return dict(state), arch if isinstance(arch, str) else None
    if "model" in ckpt:
        model = ckpt["model"]
        if not isinstance(model, dict):
            raise CheckpointError(f"{source}: 'model' is not a state dict")
        model = _strip_module(model)
        state = {k[len(TEACHER_PREFIX):]: v for k, v in model.items() if k.startswith(TEACHER_PREFIX)}
        if not state:
            prefixes = sorted({k.split(".")[0] for k in model})[:12]
            raise CheckpointError(
                f"{source}: no teacher encoder in the checkpoint: no key of 'model' starts with "
                f"{TEACHER_PREFIX!r} (top-level prefixes found: {prefixes})"
            )
        return state, _config_arch(ckpt)
    raise CheckpointError(
        f"{source}: no encoder in the checkpoint: expected a 'model' (full pretraining checkpoint) or "
        f"'backbone' (exported backbone) entry, found keys {sorted(map(str, ckpt))[:12]}"
    )


def key_shape_diff(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]]) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, wrong_shape)`` keys of ``state`` (tensors or arrays) against ``expected`` shapes, sorted."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k]))
    return missing, unexpected, wrong_shape


def verify_resnet_state(state: dict[str, torch.Tensor], arch: str, source: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Check ``state`` is exactly torchvision's ``arch`` (no fc); return it without BN counters.

    Raises CheckpointError naming the missing, unexpected or wrongly shaped keys.
    """
    expected = expected_resnet_shapes(arch)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing, unexpected, wrong = key_shape_diff(state, expected)
    bad_shape = [f"{k}: {tuple(state[k].shape)} != {expected[k]}" for k in wrong]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:5]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:5]})")
    if bad_shape:
        problems.append(f"{len(bad_shape)} wrong shapes (e.g. {bad_shape[:3]})")
    if problems:
        raise CheckpointError(f"{source}: the teacher encoder is not a torchvision {arch}: " + "; ".join(problems))
    for k, v in state.items():
        if not torch.is_floating_point(v):
            raise CheckpointError(f"{source}: tensor {k} has dtype {v.dtype}, expected floating point")
    return state


def load_teacher_encoder(path: str | Path, arch: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Read the teacher encoder of ``path`` and verify it key by key.

    Args:
        path: full pretraining checkpoint, exported backbone, or a run directory (its newest good checkpoint).
        arch: the depth the caller requires (e.g. ``"resnet50"``); ``None`` accepts the checkpoint's.

    Returns:
        ``(state_dict, arch)``: torchvision ResNet key names, float tensors on CPU, no ``fc``,
        no ``num_batches_tracked``; ``arch`` as ``"resnet<depth>"``.

    Raises:
        CheckpointError: unreadable file, no encoder, a layout that is no ResNet, a declared arch that
        disagrees with the tensors, or an arch other than the requested one.
    """
    path = resolve_checkpoint(path)
    state, declared = extract_teacher_encoder(_read(path), str(path))
    found = infer_arch(state)
    if declared is not None and declared != found:
        raise CheckpointError(f"{path}: the checkpoint declares arch {declared!r} but its tensors are a {found}")
    if arch is not None and arch != found:
        raise CheckpointError(
            f"{path}: depth mismatch: requested {arch} (depth {depth_of(arch)}) but the checkpoint's "
            f"teacher encoder is a {found} (depth {depth_of(found)})"
        )
    state = verify_resnet_state(state, found, str(path))
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}, found


def state_checksum(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 (first 16 hex digits) over sorted key names and raw bytes: identifies converted weights."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]
