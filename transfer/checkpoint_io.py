"""Read and verify the teacher encoder from a pretraining checkpoint (shared by both converters).

Four inputs are accepted (docs/contracts.md, "Checkpoints"):

* a full pretraining checkpoint ``{"model": method.state_dict(), ...}`` whose teacher encoder lives
  under the prefix ``teacher_encoder.`` (a DDP ``module.`` prefix in front is tolerated);
* an exported backbone ``{"backbone": state_dict, "arch": str}``;
* the official SlotCon release layout (``{"args": Namespace, "model": {"module.encoder_k.*", ...}, ...}``,
  see ``transfer/official_slotcon.py``): its teacher ``encoder_k``, never the student ``encoder_q``;
* a plain torchvision ResNet state dict (``conv1.weight``, ``layer1.0...``, optionally ``module.``
  prefixed); its classifier ``fc.*`` is dropped.

The encoder must carry torchvision ResNet key names without ``fc``. Every key of the torchvision
ResNet of that depth must be present with the right shape, and nothing else may be there; the
BN ``num_batches_tracked`` counters are optional and dropped (they are bookkeeping, not weights).
SlotCon transfers the teacher encoder (SlotCon Sec. 4.2), which is why only the teacher is read.
Files are read with ``torch.load(weights_only=True)``; the only non-tensor type allowed on top of
its defaults is ``argparse.Namespace`` (the official checkpoint's ``args``), so a pickle naming any
other global is refused without running it. Detectron2's ``.pkl`` weights are plain pickles of numpy
arrays; :func:`read_plain_pickle` reads them with an unpickler that builds containers and arrays only.
Every reader of an input file in the project goes through one of these two functions, and the tensors
they return pass :func:`check_finite` before anything is converted, trained or evaluated.
"""
from __future__ import annotations

import argparse
import hashlib
import pickle
import re
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torchvision

TEACHER_PREFIX = "teacher_encoder."
# The one type beyond weights_only's defaults that a supported checkpoint holds: the official
# SlotCon file pickles its argparse.Namespace of command-line arguments.
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
# Top-level modules of a torchvision ResNet state dict (the plain-state-dict input).
_TORCHVISION_ROOTS = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.", "fc.")

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


EXIT_REFUSED = 2


def refuse(exc: Exception, prefix: str = "") -> int:
    """Report a refused file the way every entry point does: one ``refused: <reason>`` line on stderr.

    Returns the exit status for it, :data:`EXIT_REFUSED`.
    """
    print(f"{prefix}refused: " + " ".join(str(exc).split()), file=sys.stderr)
    return EXIT_REFUSED


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


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> object:
    """``torch.load(path, weights_only=True)`` with ``SAFE_GLOBALS`` allowed, and nothing else.

    ``map_location`` is torch.load's (CPU by default). Types an integration registered with
    ``torch.serialization.add_safe_globals`` (mmengine's checkpoint bookkeeping, see
    ``transfer/segmentation/compat.py``) stay allowed. Raises CheckpointError naming the file and
    torch's reason (missing file, damaged archive, or a pickle that names a global outside the
    allowlist, which is refused before anything runs).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises pickle / zip / runtime errors depending on the damage
        raise CheckpointError(
            f"cannot read checkpoint {path} with torch.load(weights_only=True): {type(exc).__name__}: {_load_reason(exc)}"
        ) from exc


class _PlainDataUnpickler(pickle.Unpickler):
    """Builds plain containers and numpy arrays only; any other global is refused before it is called.

    Plain dicts, lists, tuples, strings and numbers need no global at all; numpy arrays need their
    reconstructor, ``ndarray`` and ``dtype`` (under both numpy 1's ``numpy.core`` and numpy 2's
    ``numpy._core`` names, so files written by either load), and scalars ``scalar``.
    """

    ALLOWED = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("collections", "OrderedDict"),
    })

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"the pickle names the global {module}.{name}, which is not allowed in a weights file "
            "(allowed: containers, numpy arrays and scalars); nothing in it was run")


def read_plain_pickle(path: str | Path) -> object:
    """Unpickle ``path`` (Detectron2's ``.pkl`` weights: dicts of numpy arrays) without running any code.

    Raises CheckpointError naming the file and the reason (missing, truncated, or a global that is not
    a container or numpy array: what a crafted pickle needs in order to run code).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights not found: {path}")
    try:
        with open(path, "rb") as f:
            # latin1: Caffe2-era pickles written by Python 2 hold numpy buffers as byte strings.
            return _PlainDataUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # truncation and junk raise EOFError, UnpicklingError, ValueError, ...
        raise CheckpointError(f"cannot read {path} as plain weights: {type(exc).__name__}: {exc}") from exc


def read_weights_file(path: str | Path, map_location: Any = "cpu") -> object:
    """Any weights file, read without running code: ``.pkl`` by :func:`read_plain_pickle`, else :func:`read_checkpoint`."""
    return read_plain_pickle(path) if str(path).endswith(".pkl") else read_checkpoint(path, map_location)


def check_finite(state: Mapping[str, Any], source: str = "<checkpoint>", what: str = "tensors") -> None:
    """Refuse ``state`` (name -> tensor or array) if any floating-point entry holds NaN or Inf.

    Raises CheckpointError naming the count and the first few such keys with their number of bad
    values: such weights train to NaN or score a meaningless number, so nothing may start from them.
    """
    bad, checked = [], 0
    for k in sorted(state, key=str):
        v = state[k]
        if isinstance(v, torch.Tensor) and (torch.is_floating_point(v) or v.is_complex()):
            n, size = int((~torch.isfinite(v)).sum()), v.numel()
        elif isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.inexact):
            n, size = int((~np.isfinite(v)).sum()), v.size
        else:
            continue
        checked += 1
        if n:
            bad.append(f"{k} ({n} of {size} values)")
    if bad:
        raise CheckpointError(f"{source}: non-finite values (NaN/Inf) in {len(bad)} of {checked} {what}: "
                              f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")


def _load_reason(exc: Exception) -> str:
    """The line of torch's load error that says what is wrong (its first line is generic advice)."""
    text = str(exc).strip()
    # Two wordings, by torch version and by whether the global's module is blocked outright.
    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text, re.IGNORECASE)
    if found:
        # torch goes on to suggest allow-listing the global; for a weights file that is the wrong advice.
        return (f"the pickle names the global {found.group(1)}, which is not allowed in a weights file "
                f"(allowed: tensors, containers, {', '.join(t.__module__ + '.' + t.__qualname__ for t in SAFE_GLOBALS)}); "
                "nothing in it was run")
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()
    return text.splitlines()[0] if text else ""


def strip_module(state: dict) -> dict:
    """``state`` without the DDP ``module.`` prefix when every key carries it; else unchanged."""
    # A DDP-wrapped method saves every key under "module."; the contract's prefixes start after it.
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def is_torchvision_state(obj: object) -> bool:
    """True for a plain torchvision ResNet state dict (tensors under ``conv1.``, ``layer1.``, ...)."""
    if not isinstance(obj, dict) or not obj:
        return False
    state = strip_module(obj)
    return ("conv1.weight" in state and all(isinstance(v, torch.Tensor) for v in state.values())
            and all(isinstance(k, str) and k.startswith(_TORCHVISION_ROOTS) for k in state))


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
    # Imported here: official_slotcon builds on this module's helpers.
    from .official_slotcon import is_official_checkpoint, official_teacher_encoder

    if is_official_checkpoint(ckpt):
        return official_teacher_encoder(ckpt, source)
    if is_torchvision_state(ckpt):
        # The ImageNet classifier is no part of the backbone a detector or segmenter starts from.
        return {k: v for k, v in strip_module(ckpt).items() if not k.startswith("fc.")}, None
    if "backbone" in ckpt:
        state, arch = ckpt["backbone"], ckpt.get("arch")
        if not isinstance(state, dict):
            raise CheckpointError(f"{source}: 'backbone' is not a state dict")
        return dict(state), arch if isinstance(arch, str) else None
    if "model" in ckpt:
        model = ckpt["model"]
        if not isinstance(model, dict):
            raise CheckpointError(f"{source}: 'model' is not a state dict")
        model = strip_module(model)
        state = {k[len(TEACHER_PREFIX):]: v for k, v in model.items() if k.startswith(TEACHER_PREFIX)}
        if not state:
            prefixes = sorted({k.split(".")[0] for k in model})[:12]
            raise CheckpointError(
                f"{source}: no teacher encoder in the checkpoint: no key of 'model' starts with "
                f"{TEACHER_PREFIX!r} (top-level prefixes found: {prefixes})"
            )
        return state, _config_arch(ckpt)
    raise CheckpointError(
        f"{source}: no encoder in the checkpoint: expected a 'model' (full pretraining or official SlotCon "
        f"checkpoint) or 'backbone' (exported backbone) entry, or torchvision ResNet keys, found keys "
        f"{sorted(map(str, ckpt))[:12]}"
    )


def _shape_of(value: Any) -> tuple[int, ...] | None:
    """The shape of a tensor or array; None for anything else (which then fits no expected shape)."""
    return tuple(value.shape) if isinstance(value, (torch.Tensor, np.ndarray)) else None


def key_shape_diff(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]]) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, wrong_shape)`` keys of ``state`` (tensors or arrays) against ``expected`` shapes, sorted.

    A value that is neither a tensor nor an array counts as wrongly shaped.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if _shape_of(state[k]) != tuple(expected[k]))
    return missing, unexpected, wrong_shape


def describe_key_shape_diff(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]]) -> str:
    """'' when ``state`` has exactly ``expected``'s keys and shapes; else one line naming the differences.

    The one wording of every key/shape refusal (converters, transfer entry points, evaluation):
    counts and the first few keys of each kind, missing ones flagged as what would stay random.
    """
    missing, unexpected, wrong = key_shape_diff(state, expected)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (would stay random), e.g. {missing[:5]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[:5]}")
    if wrong:
        shown = [f"{k}: {_shape_of(state[k]) or type(state[k]).__name__} != {tuple(expected[k])}" for k in wrong[:3]]
        parts.append(f"{len(wrong)} wrong shapes, e.g. {shown}")
    return "; ".join(parts)


def verify_resnet_state(state: dict[str, torch.Tensor], arch: str, source: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Check ``state`` is exactly torchvision's ``arch`` (no fc) with finite values; return it without BN counters.

    Raises CheckpointError naming the missing, unexpected, wrongly shaped or non-finite keys.
    """
    expected = expected_resnet_shapes(arch)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    problems = describe_key_shape_diff(state, expected)
    if problems:
        raise CheckpointError(f"{source}: the teacher encoder is not a torchvision {arch}: {problems}")
    for k, v in state.items():
        if not torch.is_floating_point(v):
            raise CheckpointError(f"{source}: tensor {k} has dtype {v.dtype}, expected floating point")
    check_finite(state, f"{source}: teacher encoder")
    return state


def encoder_variant(ckpt: object) -> dict[str, Any]:
    """The encoder options of a loaded checkpoint that change the network built from the same keys.

    ``{"stem_pool": bool, "last_stride": int}`` from a pretraining checkpoint's ``config["model"]`` or an
    exported backbone's ``encoder``; the standard ResNet for the official SlotCon layout and plain
    torchvision state dicts (their ResNets have the stem max-pool and stride 32); ``{}`` when unknown.
    """
    if not isinstance(ckpt, dict):
        return {}
    source = None
    if isinstance(ckpt.get("encoder"), dict):
        source = ckpt["encoder"]
    elif isinstance(ckpt.get("config"), dict) and isinstance(ckpt["config"].get("model"), dict):
        source = ckpt["config"]["model"]
    if source is None:
        from .official_slotcon import is_official_checkpoint

        if is_official_checkpoint(ckpt) or is_torchvision_state(ckpt):
            source = {}  # their ResNets are torchvision's own: the defaults
        else:
            return {}
    from pretrain.engine.checkpoint import encoder_variant as variant_of_model_config

    return variant_of_model_config(source)


def load_teacher_encoder(path: str | Path, arch: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Read the teacher encoder of ``path`` and verify it key by key (:func:`load_teacher_encoder_with_variant`
    without the encoder variant)."""
    state, found, _ = load_teacher_encoder_with_variant(path, arch)
    return state, found


def load_teacher_encoder_with_variant(path: str | Path, arch: str | None = None
                                      ) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """Read the teacher encoder of ``path``, verify it key by key, and say which encoder variant it is.

    Args:
        path: full pretraining checkpoint, exported backbone, official SlotCon checkpoint, plain torchvision
            ResNet state dict, or a run directory (its newest good checkpoint).
        arch: the depth the caller requires (e.g. ``"resnet50"``); ``None`` accepts the checkpoint's.

    Returns:
        ``(state_dict, arch, variant)``: torchvision ResNet key names, float tensors on CPU, no ``fc``,
        no ``num_batches_tracked``; ``arch`` as ``"resnet<depth>"``; ``variant`` from :func:`encoder_variant`.

    Raises:
        CheckpointError: unreadable file, no encoder, a layout that is no ResNet, a declared arch that
        disagrees with the tensors, or an arch other than the requested one.
    """
    path = resolve_checkpoint(path)
    ckpt = read_checkpoint(path)
    state, declared = extract_teacher_encoder(ckpt, str(path))
    found = infer_arch(state)
    if declared is not None and declared != found:
        raise CheckpointError(f"{path}: the checkpoint declares arch {declared!r} but its tensors are a {found}")
    if arch is not None and arch != found:
        raise CheckpointError(
            f"{path}: depth mismatch: requested {arch} (depth {depth_of(arch)}) but the checkpoint's "
            f"teacher encoder is a {found} (depth {depth_of(found)})"
        )
    state = verify_resnet_state(state, found, str(path))
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}, found, encoder_variant(ckpt)


def state_checksum(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 (first 16 hex digits) over sorted key names and raw bytes: identifies converted weights."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]
