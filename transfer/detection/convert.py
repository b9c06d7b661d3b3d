"""Torchvision ResNet teacher encoder -> Detectron2 backbone weights (the ``.pkl`` Detectron2 reads).

SlotCon transfers the teacher encoder to Mask R-CNN R50-FPN in Detectron2 (SlotCon Sec. 4.2). The
file format is Detectron2's pickle: ``{"model": {name: np.ndarray}, "__author__": str,
"matching_heuristics": True}``; with ``matching_heuristics`` Detectron2 matches ``stem.*`` / ``res*``
to ``backbone.bottom_up.*`` by suffix, as for the MoCo/DetCo/SlotCon converted weights.
Detectron2 itself unpickles ``.pkl`` files with plain ``pickle``, so a crafted file would run code:
:func:`read_d2_weights` is how ``python -m transfer.detection`` (and its checkpointer) reads every file.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transfer.checkpoint_io import (
    RESNET_LAYOUT, CheckpointError, check_finite, depth_of, describe_key_shape_diff, expected_resnet_shapes,
    read_plain_pickle, read_weights_file, state_checksum,
)

AUTHOR = "objcentric-pretrain (teacher encoder)"

_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


def rename_key(key: str) -> str:
    """One torchvision ResNet key -> its Detectron2 ResNet key.

    ``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``; ``layerI.J`` -> ``res{I+1}.J``;
    ``bnK`` -> ``convK.norm``; ``downsample.0``/``.1`` -> ``shortcut``/``shortcut.norm``.
    """
    if key.startswith("conv1."):
        return "stem." + key
    if key.startswith("bn1."):
        return "stem.conv1.norm." + key[len("bn1."):]
    m = re.fullmatch(r"layer([1-4])\.(\d+)\.(.+)", key)
    if m is None:
        raise CheckpointError(f"not a torchvision ResNet backbone key: {key!r}")
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
    rest = re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)
    if not re.fullmatch(r"(conv\d|shortcut)\.(weight|norm\.(weight|bias|running_mean|running_var))", rest):
        raise CheckpointError(f"not a torchvision ResNet backbone key: {key!r}")
    return f"res{stage}.{block}.{rest}"


def expected_d2_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of Detectron2's own ResNet of ``arch``'s depth (without BN counters).

    Built with Detectron2's ``build_resnet_backbone`` on the meta device when Detectron2 is
    importable; otherwise from torchvision's ResNet through :func:`rename_key` (same set).
    """
    depth = depth_of(arch)
    try:
        import transfer.detection.compat  # noqa: F401  (Pillow/numpy aliases for Detectron2 v0.6)
        from detectron2.config import get_cfg
        from detectron2.layers import ShapeSpec
        from detectron2.modeling.backbone import build_resnet_backbone
    except ImportError:
        return {rename_key(k): s for k, s in expected_resnet_shapes(arch).items()}
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.FREEZE_AT = 0  # keep every stage's BN a BatchNorm (frozen BN drops no keys, but be plain)
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    if depth < 50:
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64  # Detectron2 requires 64 for BasicBlock ResNets
    with torch.device("meta"):
        model = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def to_detectron2(state: dict[str, torch.Tensor], arch: str) -> dict[str, np.ndarray]:
    """Rename a verified torchvision ResNet state dict and check it against Detectron2's ResNet.

    Every Detectron2 backbone key of the depth must be produced exactly once with the right shape
    and nothing else; otherwise CheckpointError names the offending keys.
    """
    if arch not in RESNET_LAYOUT:
        raise CheckpointError(f"unknown architecture {arch!r}")
    out: dict[str, np.ndarray] = {}
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            continue
        new = rename_key(k)
        if new in out:
            raise CheckpointError(f"two source keys map to the Detectron2 key {new!r} (second: {k!r})")
        out[new] = v.detach().cpu().float().numpy()
    problems = describe_key_shape_diff(out, expected_d2_shapes(arch))
    if problems:
        raise CheckpointError(f"conversion to Detectron2 {arch} failed verification: {problems}")
    return out


def write_d2_pickle(arrays: dict[str, np.ndarray], out: str | Path, encoder: dict | None = None) -> Path:
    """Write Detectron2's pickle format atomically (temporary file, then rename).

    ``encoder`` (e.g. ``{"stem_pool": False, "last_stride": 2}``) records the pretraining encoder's
    variant under the extra key ``encoder``, which Detectron2's checkpointer ignores and
    ``python -m transfer.detection`` checks against the config.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    record = {"model": arrays, "__author__": AUTHOR, "matching_heuristics": True}
    if encoder:
        record["encoder"] = dict(encoder)
    with open(tmp, "wb") as f:
        pickle.dump(record, f)
    tmp.replace(out)
    return out


def read_d2_weights(path: str | Path) -> dict[str, Any]:
    """A weights file as Detectron2's checkpointer hands it to ``_load_model``, read without running code.

    ``.pkl``: this project's converted backbone or a Detectron2 model-zoo file (``{"model", "__author__",
    ...}``, returned as is) or a Caffe2-era pickle (wrapped as Detectron2 wraps it), through the
    containers-and-arrays unpickler; ``.pyth``: pycls's ``model_state``; anything else (Detectron2's own
    ``.pth`` checkpoints: ``model`` plus ``iteration`` and trainer state) through
    ``torch.load(weights_only=True)``. Raises CheckpointError naming the file and the reason: unreadable,
    a pickle that names a global beyond those, no ``model`` mapping, or non-finite ``model`` tensors.
    """
    path = Path(path)
    data = read_weights_file(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict of weights, got {type(data).__name__}")
    if path.suffix == ".pkl" and not ("model" in data and "__author__" in data):
        # Detectron2's own reading of a Caffe2 / Detectron1 model-zoo pickle, with the same renames.
        blobs = data["blobs"] if isinstance(data.get("blobs"), dict) else data
        data = {"model": {k: v for k, v in blobs.items() if not str(k).endswith("_momentum")},
                "__author__": "Caffe2", "matching_heuristics": True}
    elif path.suffix == ".pyth":
        if not isinstance(data.get("model_state"), dict):
            raise CheckpointError(f"{path}: a .pyth (pycls) checkpoint needs 'model_state'")
        data = {"model": {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")},
                "__author__": "pycls", "matching_heuristics": True}
    elif "model" not in data:
        data = {"model": data}
    if not isinstance(data["model"], dict):
        raise CheckpointError(f"{path}: 'model' is a {type(data['model']).__name__}, not a mapping of weights")
    check_finite(data["model"], str(path))
    return data


def encoder_meta(record: dict[str, Any]) -> dict:
    """The ``encoder`` record (``{"stem_pool": bool, ...}``) of a loaded weights file; {} when absent."""
    meta = record.get("encoder") if isinstance(record, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def read_encoder_meta(path: str | Path) -> dict:
    """The ``encoder`` record of a Detectron2 weights ``.pkl`` ({} when absent), read without running code."""
    return encoder_meta(read_plain_pickle(path))


def summary(source: str | Path, out: str | Path, arch: str, arrays: dict[str, np.ndarray]) -> str:
    """The one-screen report of a conversion: source, depth, number of tensors, parameters, checksum."""
    n_params = sum(int(a.size) for a in arrays.values())
    return "\n".join(
        [
            f"source     : {source}",
            f"written    : {out}",
            f"arch/depth : {arch} / {depth_of(arch)}",
            f"tensors    : {len(arrays)} (all Detectron2 backbone keys of depth {depth_of(arch)}, verified)",
            f"values     : {n_params:,}",
            f"checksum   : {state_checksum(arrays)} (sha256 of names + float32 bytes)",
        ]
    )
