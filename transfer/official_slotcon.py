"""The official SlotCon release layout (the authors' ``main_pretrain.py``), mapped onto this project.

This is the one place that knows that layout; the converters (through
``transfer.checkpoint_io.load_teacher_encoder``) and the evaluation loader
(``pretrain.eval.inference.load_method``) both read it from here.

What such a file holds (e.g. the released ``slotcon_coco_r50_800ep.pth``)::

    {"args": argparse.Namespace, "epoch": int, "model": {...}, "optimizer": {...},
     "scheduler": {...}, ["scaler": {...}]}

``model`` is a DDP state dict (every key under ``module.``) with

* ``encoder_q.*`` / ``encoder_k.*``: student / teacher ResNet, torchvision key names, no ``fc``;
* ``projector_q.mlp.*`` / ``projector_k.mlp.*``: the dense 3-layer head (1x1 conv, BN, GELU, 1x1 conv,
  BN, GELU, 1x1 conv), whose ``nn.Sequential`` indices are those of ``pretrain.models.heads.Projector``;
* ``grouping_q.slot_embed.weight`` / ``grouping_k.slot_embed.weight``: the K x D prototypes, an
  ``nn.Embedding`` there and the parameter ``weight`` of ``SemanticGrouping`` here;
* ``predictor_slot.mlp.*``: the slot predictor (linear layers, ``pretrain.models.heads.Predictor``);
* ``center``: the teacher centre, shape ``(1, K)`` there and ``(K,)`` here.

The teacher is the ``_k`` side. The student ``encoder_q`` is never a substitute for a missing
``encoder_k``: SlotCon transfers and evaluates the teacher.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Mapping

import torch

from .checkpoint_io import CheckpointError, strip_module

# Official module prefix -> this project's SlotCon prefix (pretrain/methods/slotcon.py).
KEY_MAP: dict[str, str] = {
    "encoder_q.": "encoder.",
    "encoder_k.": "teacher_encoder.",
    "projector_q.": "projector.",
    "projector_k.": "teacher_projector.",
    "grouping_q.slot_embed.": "prototypes.",
    "grouping_k.slot_embed.": "teacher_prototypes.",
    "predictor_slot.": "predictor.",
}
TEACHER_ENCODER_PREFIX = "encoder_k."
STUDENT_ENCODER_PREFIX = "encoder_q."
CENTER_KEY = "center"
_OFFICIAL_ROOTS = tuple(sorted({p.split(".")[0] + "." for p in KEY_MAP}))

# args fields that shape the network or its assignments: without them the teacher cannot be rebuilt.
_REQUIRED_ARGS = ("arch", "dim_hidden", "dim_out", "num_prototypes", "teacher_temp")
# Training-only fields, with the defaults of the official parser when a file lacks them.
_OPTIONAL_ARGS: dict[str, float] = {
    "student_temp": 0.1, "group_loss_weight": 0.5, "teacher_momentum": 0.99, "center_momentum": 0.9,
}
# The slot-contrast temperature is a constant of the official loss, not an argument.
OFFICIAL_TAU_C = 0.2


def is_official_model(model: Mapping[str, Any]) -> bool:
    """True when a (``module.``-stripped or not) state dict uses the official SlotCon module names."""
    keys = strip_module(dict(model)).keys()
    return any(isinstance(k, str) and k.startswith(_OFFICIAL_ROOTS) for k in keys)


def is_official_checkpoint(ckpt: object) -> bool:
    """True for a dict whose ``model`` is an official SlotCon state dict (``args`` is not required here)."""
    return isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and is_official_model(ckpt["model"])


def official_args(ckpt: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's ``args`` as a plain dict (from an ``argparse.Namespace`` or a mapping), or None."""
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, Mapping):
        return dict(args)
    return None


def _prefixes(keys) -> list[str]:
    return sorted({k.split(".")[0] for k in keys})[:12]


def official_teacher_encoder(ckpt: Mapping[str, Any], source: str = "<checkpoint>"
                             ) -> tuple[dict[str, torch.Tensor], str | None]:
    """The raw ``encoder_k`` state dict of an official checkpoint and the arch its ``args`` declare.

    Raises CheckpointError when ``encoder_k`` is absent, whatever else (``encoder_q``) is there.
    """
    model = strip_module(dict(ckpt["model"]))
    state = {k[len(TEACHER_ENCODER_PREFIX):]: v for k, v in model.items() if k.startswith(TEACHER_ENCODER_PREFIX)}
    if not state:
        student = any(k.startswith(STUDENT_ENCODER_PREFIX) for k in model)
        raise CheckpointError(
            f"{source}: official SlotCon checkpoint without the teacher encoder: no key of 'model' starts "
            f"with 'module.{TEACHER_ENCODER_PREFIX}' (prefixes found: {_prefixes(model)})"
            + ("; the student 'encoder_q' is not used in its place" if student else "")
        )
    args = official_args(ckpt) or {}
    arch = args.get("arch")
    return state, arch if isinstance(arch, str) else None


def _arg(args: Mapping[str, Any], name: str, kind: type, source: str, default: Any = None) -> Any:
    if name not in args or args[name] is None:
        if default is None:
            raise CheckpointError(f"{source}: official SlotCon checkpoint: args.{name} is missing; "
                                  f"it is needed to rebuild the network (args has {sorted(args)[:20]})")
        return default
    value = args[name]
    ok = isinstance(value, str) if kind is str else (
        isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or isinstance(value, int)))
    if not ok:
        raise CheckpointError(f"{source}: official SlotCon checkpoint: args.{name} = {value!r} is not a {kind.__name__}")
    return kind(value)


def official_model_config(args: Mapping[str, Any], source: str = "<checkpoint>"):
    """This project's ``ModelConfig`` of the network an official run trained, from its ``args``.

    The official ResNet is torchvision's (stem max-pool, output stride 32) and zeroes the last BN
    gamma of each block at initialisation, which ``zero_init_residual`` reproduces for a random baseline.
    """
    from pretrain.methods.config import ModelConfig

    values = {name: _arg(args, name, str if name == "arch" else (float if name == "teacher_temp" else int), source)
              for name in _REQUIRED_ARGS}
    values.update({name: _arg(args, name, float, source, default) for name, default in _OPTIONAL_ARGS.items()})
    return ModelConfig(
        method="slotcon", arch=values["arch"], grouping="prototypes", num_prototypes=values["num_prototypes"],
        dim_hidden=values["dim_hidden"], dim_out=values["dim_out"], teacher_momentum=values["teacher_momentum"],
        tau_s=values["student_temp"], tau_t=values["teacher_temp"], center_momentum=values["center_momentum"],
        tau_c=OFFICIAL_TAU_C, lambda_g=values["group_loss_weight"], zero_init_residual=True, stem_pool=True,
        last_stride=2,
    )


def official_method_state(ckpt: Mapping[str, Any], source: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The official ``model`` renamed to this project's SlotCon state-dict keys.

    Every key must map; one that does not (a module this project's SlotCon lacks) is an error naming it.
    """
    model = strip_module(dict(ckpt["model"]))
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in model.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: official SlotCon checkpoint: model[{key!r}] is a "
                                  f"{type(value).__name__}, not a tensor")
        if key == CENTER_KEY:
            # (1, K) there, (K,) here: same numbers, one axis fewer.
            if value.dim() != 2 or value.shape[0] != 1:
                raise CheckpointError(f"{source}: official SlotCon checkpoint: center has shape "
                                      f"{tuple(value.shape)}, expected (1, K)")
            out[CENTER_KEY] = value.reshape(-1)
            continue
        for old, new in KEY_MAP.items():
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise CheckpointError(f"{source}: official SlotCon checkpoint: {len(unmapped)} keys of 'model' belong to "
                              f"no module of this project's SlotCon (e.g. {sorted(unmapped)[:5]})")
    return out


def official_summary(ckpt: Mapping[str, Any], cfg) -> dict[str, Any]:
    """A JSON-safe description of an official checkpoint (what the evaluation records as its config)."""
    args = official_args(ckpt) or {}
    seed = args.get("seed")
    return {
        "format": "official SlotCon (main_pretrain.py)",
        "epoch": ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None,
        "model": dataclasses.asdict(cfg),
        "train": {"seed": seed if isinstance(seed, int) and not isinstance(seed, bool) else 0},
        "args": {k: v for k, v in args.items() if isinstance(v, (str, int, float, bool)) or v is None},
    }


__all__ = [
    "KEY_MAP", "is_official_model", "is_official_checkpoint", "official_args", "official_teacher_encoder",
    "official_model_config", "official_method_state", "official_summary",
]
