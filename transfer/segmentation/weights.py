"""The pretrained teacher encoder in MMSegmentation's format, and the checks that it loads completely.

File format written by ``tools/convert_to_mmseg.py`` (plain tensors and primitive types only, so it
loads with ``torch.load(weights_only=True)``)::

    {"state_dict": {"conv1.weight": ..., "bn1.running_mean": ..., "layer1.0.conv1.weight": ...},
     "meta": {"arch": "resnet50", "depth": 50, "source": "<input path>", "checksum": "<sha256[:16]>",
              "format": "mmseg-resnet"}}

Key names are those of mmseg's ``type='ResNet'`` backbone *without* a prefix (they coincide with
torchvision's: ``conv1``/``bn1`` stem, ``layerN.i.{conv,bn}k``, ``layerN.0.downsample.{0,1}``). That is
what mmseg's backbone-level ``init_cfg=dict(type='Pretrained', checkpoint=FILE)`` consumes (mmengine's
``load_checkpoint`` reads ``state_dict`` and loads it into ``model.backbone``); ``model.pretrained=FILE``
is equivalent. Whole-model ``load_from`` would need the prefix ``backbone.``: not used here.
The file holds *every* entry of that backbone's ``state_dict()`` (BN ``num_batches_tracked`` as 0), so
``backbone.load_state_dict(sd, strict=True)`` succeeds too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from transfer.checkpoint_io import (
    CheckpointError, check_finite, depth_of, describe_key_shape_diff, load_teacher_encoder_with_variant,
    read_checkpoint, state_checksum,
)

from . import compat  # noqa: F401  (mmcv.ops placeholder before mmseg is imported)

FORMAT = "mmseg-resnet"
# Backbone types built from torchvision-style ResNet keys (ResNetStemVariant: transfer/segmentation/backbones.py).
RESNET_TYPES = ("ResNet", "ResNetStemVariant")


def mmseg_resnet_shapes(depth: int, backbone_cfg: dict | None = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of mmseg's ``ResNet(depth)`` state dict (``num_batches_tracked`` included).

    Built with mmseg's own class on the meta device, so the check follows mmseg, not a copy of it.
    ``backbone_cfg`` (a config's ``model.backbone``) may change strides/dilations; they do not change shapes.
    """
    from mmseg.models.backbones import ResNet

    kwargs: dict[str, Any] = {"depth": depth}
    if backbone_cfg:
        for key in ("num_stages", "strides", "dilations", "out_indices", "style", "deep_stem",
                    "avg_down", "contract_dilation", "stem_channels", "base_channels"):
            if key in backbone_cfg:
                kwargs[key] = backbone_cfg[key]
    kwargs["norm_cfg"] = dict(type="BN", requires_grad=True)  # SyncBN has the same keys; BN builds anywhere
    with torch.device("meta"):
        model = ResNet(**kwargs)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def to_mmseg_state(state: dict[str, torch.Tensor], arch: str, source: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Map a verified torchvision-named encoder (``checkpoint_io``) to mmseg ``ResNet`` keys, exactly.

    The names coincide; this adds the BN ``num_batches_tracked`` counters (0) and verifies the result
    against mmseg's own ``ResNet(depth)``: every key present once with the right shape, nothing else.
    """
    expected = mmseg_resnet_shapes(depth_of(arch))
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        out[k] = v.detach().cpu().contiguous()
    for k in expected:
        if k.endswith("num_batches_tracked") and k not in out:
            out[k] = torch.tensor(0, dtype=torch.long)
    problems = describe_key_shape_diff(out, expected)
    if problems:
        raise CheckpointError(f"{source}: the encoder does not map onto mmseg ResNet-{depth_of(arch)}: {problems}")
    return out


def convert(src: str | Path, dst: str | Path, arch: str | None = None) -> dict[str, Any]:
    """Convert a pretraining checkpoint or exported backbone to the mmseg file above.

    Args:
        src: full pretraining checkpoint (teacher encoder under ``teacher_encoder.``) or exported backbone.
        dst: output ``.pth``; written to a temporary file and renamed, so a crash leaves no half file.
        arch: required depth (``"resnet50"``); ``None`` accepts the checkpoint's.

    Returns the summary: arch, number of tensors and parameters, checksum, paths.
    Raises CheckpointError (unreadable, no encoder, wrong depth, incomplete or extra keys).
    """
    state, found, variant = load_teacher_encoder_with_variant(src, arch)
    out = to_mmseg_state(state, found, str(src))
    checksum = state_checksum({k: v.numpy() for k, v in state.items()})
    meta = {"arch": found, "depth": depth_of(found), "source": str(src), "checksum": checksum, "format": FORMAT,
            "encoder": variant}
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    torch.save({"state_dict": out, "meta": meta}, tmp)
    tmp.replace(dst)
    n_params = sum(v.numel() for k, v in out.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    return {**meta, "output": str(dst), "tensors": len(out), "parameters": n_params}


def load_converted(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a converted file (``weights_only=True``, finite values); error naming the path if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"converted weights not found: {path} (make them with tools/convert_to_mmseg.py)")
    obj = read_checkpoint(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a converted backbone (expected a dict with 'state_dict'); "
                              "convert pretraining checkpoints with tools/convert_to_mmseg.py first")
    check_finite(obj["state_dict"], str(path))
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    return obj["state_dict"], meta


def check_checkpoint(path: str | Path, role: str) -> None:
    """Refuse an mmengine checkpoint (``--eval-only``'s, or the one ``--resume`` continues) that cannot be used.

    Read as mmengine will read it (``weights_only`` with mmengine's bookkeeping types allowed, see
    ``compat``); its ``state_dict`` must be a mapping of finite tensors. Raises CheckpointError naming
    ``role`` and the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{role}: checkpoint {path} not found")
    try:
        obj = read_checkpoint(path)
        state = obj.get("state_dict") if isinstance(obj, dict) else None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: not an mmengine checkpoint (expected a dict with 'state_dict')")
        check_finite(state, str(path))
    except CheckpointError as exc:
        raise CheckpointError(f"{role}: {exc}") from exc


def check_weights_fit_config(path: str | Path, backbone_cfg: dict,
                             converted: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Stop before training if any backbone key would stay random (or not fit) under ``backbone_cfg``.

    ``converted`` is :func:`load_converted`'s result when the caller already read ``path``. Returns the
    file's meta. Raises CheckpointError naming the keys and, for a depth mismatch, the overrides that
    make the config match.
    """
    state, meta = converted if converted is not None else load_converted(path)
    if backbone_cfg.get("type") not in RESNET_TYPES:
        raise CheckpointError(
            f"model.backbone.type is {backbone_cfg.get('type')!r}; converted torchvision-style weights fit "
            f"mmseg {' or '.join(RESNET_TYPES)} only (ResNetV1c's deep stem would stay random)")
    depth = int(backbone_cfg.get("depth", 50))
    file_depth = meta.get("depth")
    if file_depth is not None and int(file_depth) != depth:
        c = 2048 if int(file_depth) >= 50 else 512
        raise CheckpointError(
            f"{path} holds a ResNet-{file_depth} but the config's model.backbone.depth is {depth}; for a "
            f"ResNet-{file_depth} pass model.backbone.depth={file_depth} model.decode_head.in_channels={c} "
            f"(and model.auxiliary_head.in_channels={c // 2} where the config has one)")
    problems = describe_key_shape_diff(state, mmseg_resnet_shapes(depth, backbone_cfg))
    if problems:
        raise CheckpointError(f"{path} does not fit the config's backbone (ResNet-{depth}): {problems}")
    return meta


def mismatched_tensors(module: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Names of ``state`` entries whose values differ from ``module``'s (after initialisation)."""
    own = module.state_dict()
    bad = []
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k not in own or own[k].shape != v.shape or not torch.equal(own[k].detach().cpu().to(v.dtype), v):
            bad.append(k)
    return bad
