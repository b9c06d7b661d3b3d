"""Typed configuration of a pretraining run: YAML file + ``key=value`` overrides -> dataclasses.

The YAML under ``configs/pretrain/`` is merged onto the structured schema below (OmegaConf
structured configs), then the command-line overrides are merged on top. Any unknown key or a
value of the wrong type is a :class:`ConfigError` that names the full key and lists the valid
keys of its section, so a typo never silently falls back to a default.

Sections: ``data`` (:class:`pretrain.data.config.DataConfig`), ``model``
(:class:`pretrain.methods.config.ModelConfig`), ``optim``, ``train`` and ``log`` (below).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.data.config import DataConfig
from pretrain.methods.config import ModelConfig
from pretrain.engine.precision import AMP_CHOICES


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (SlotCon Sec. 4.1; recipe details in DESIGN.md)."""

    name: str = "lars"  # lars | sgd | adamw
    base_lr: float = 1.0  # peak LR = base_lr * batch_size / 256 when scale_lr is true
    scale_lr: bool = True  # linear scaling rule (LearningRate = 1.0 x BatchSize/256)
    weight_decay: float = 1e-5
    momentum: float = 0.9
    lars_eta: float = 0.001  # LARS trust coefficient
    warmup_epochs: float = 5.0  # linear warm-up from peak/100 to peak, per step
    min_lr: float = 1e-6  # end of the cosine
    batch_size: int = 512  # global batch size, split evenly over ranks
    clip_grad: float = 0.0  # max global grad norm; 0 disables


@dataclass
class TrainConfig:
    """Loop, precision, checkpointing and run-directory settings."""

    epochs: int = 800
    max_steps: int = 0  # stop after this many global steps (0: run all epochs); schedules still span all epochs
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16 where the hardware has it; fp16 on other GPUs; none on other CPUs) | none | bf16 | fp16
    channels_last: bool = True
    compile: bool = False  # torch.compile the method
    deterministic: bool = False  # deterministic algorithms (exact resume checks; slower)
    checkpoint_every_steps: int = 1000  # 0: only at epoch end
    keep_last: int = 3
    output_dir: str = "runs"
    run_dir: str = ""  # explicit run directory; default output_dir/<name>
    resume: str = "auto"  # auto (newest loadable checkpoint in the run dir) | none | <path>
    export_backbone: bool = True  # write teacher_backbone.pth at the end
    debug_nan_at_step: int = -1  # test hook: make the loss NaN at this global step (-1: off)


@dataclass
class LogConfig:
    """TensorBoard, text log and progress bar."""

    every_steps: int = 20
    image_every_steps: int = 500  # slot-assignment pictures; 0 disables
    num_images: int = 4
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class PretrainConfig:
    """A whole pretraining run."""

    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)


_CHOICES = {
    "optim.name": ("lars", "sgd", "adamw"),
    "train.amp": AMP_CHOICES,
    "train.device": ("auto", "cpu", "cuda"),
}


def _section_fields(schema: Any, path: list[str]) -> tuple[Any, str]:
    """Walk the dataclass schema along ``path[:-1]``; return the dataclass holding the last key."""
    node = schema
    for i, part in enumerate(path[:-1]):
        names = {f.name: f for f in dataclasses.fields(node)}
        if part not in names:
            _unknown(path[: i + 1], node)
        if not _is_dataclass_field(node, part):
            raise ConfigError(f"config key '{'.'.join(path[: i + 1])}' is a value, not a section "
                              f"(cannot set '{'.'.join(path)}')")
        node = _field_type(node, part)
    return node, path[-1]


def _is_dataclass_field(cls: Any, name: str) -> bool:
    return dataclasses.is_dataclass(_field_type(cls, name))


def _field_type(cls: Any, name: str) -> Any:
    default = {f.name: f for f in dataclasses.fields(cls)}[name]
    if default.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = default.default_factory()  # type: ignore[misc]
        return type(value) if dataclasses.is_dataclass(value) else None
    return None


def _unknown(path: list[str], section: Any) -> None:
    where = ".".join(path[:-1]) or "<top level>"
    valid = ", ".join(f.name for f in dataclasses.fields(section))
    raise ConfigError(f"unknown config key '{'.'.join(path)}'; valid keys of {where}: {valid}")


def _check_keys(tree: Any, schema: Any, prefix: list[str]) -> None:
    """Every key of a nested plain dict must exist in the dataclass schema."""
    if not isinstance(tree, dict):
        return
    names = {f.name for f in dataclasses.fields(schema)}
    for key, value in tree.items():
        path = prefix + [str(key)]
        if key not in names:
            _unknown(path, schema)
        sub = _field_type(schema, key)
        if sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{'.'.join(path)}' is a section; expected a mapping, got {value!r}")
            _check_keys(value, sub, path)


def _check_override_key(key: str) -> None:
    path = key.split(".")
    section, last = _section_fields(PretrainConfig, path)
    if last not in {f.name for f in dataclasses.fields(section)}:
        _unknown(path, section)
    if _field_type(section, last) is not None:
        valid = ", ".join(f.name for f in dataclasses.fields(_field_type(section, last)))
        raise ConfigError(f"config key '{key}' is a section; override one of its keys: {valid}")


def _merge(base: DictConfig, other: Any, what: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except OmegaConfBaseException as e:  # wrong type etc.: name the key
        key = getattr(e, "full_key", None) or "?"
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"invalid value for config key '{key}' in {what}: {msg}") from None


def _validate(cfg: PretrainConfig) -> None:
    for key, choices in _CHOICES.items():
        sec, name = key.split(".")
        value = getattr(getattr(cfg, sec), name)
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {list(choices)}, got {value!r}")
    positive = {"optim.batch_size": cfg.optim.batch_size, "train.epochs": cfg.train.epochs,
                "train.keep_last": cfg.train.keep_last, "optim.base_lr": cfg.optim.base_lr}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {value!r}")
    for key, value in {"optim.warmup_epochs": cfg.optim.warmup_epochs, "train.max_steps": cfg.train.max_steps,
                       "train.checkpoint_every_steps": cfg.train.checkpoint_every_steps,
                       "log.every_steps": cfg.log.every_steps, "optim.weight_decay": cfg.optim.weight_decay,
                       "log.image_every_steps": cfg.log.image_every_steps}.items():
        if value < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {value!r}")
    if cfg.optim.warmup_epochs > cfg.train.epochs:
        raise ConfigError(f"config key 'optim.warmup_epochs' ({cfg.optim.warmup_epochs}) exceeds "
                          f"'train.epochs' ({cfg.train.epochs})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """Load a pretraining config.

    Args:
        path: YAML file (``configs/pretrain/*.yaml``); ``None`` starts from the defaults.
            Its ``name`` defaults to the file's stem.
        overrides: ``key=value`` strings with dotted keys, e.g. ``optim.base_lr=0.5``
            (values parsed as YAML, so ``train.amp=none`` and ``data.color_jitter=[0.4,0.4,0.2,0.1]`` work).

    Raises:
        ConfigError: unknown key, wrong type, malformed override or invalid value; the
            message names the key (and the valid keys of its section for unknown ones).
    """
    cfg = OmegaConf.structured(PretrainConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        _check_keys(tree, PretrainConfig, [])
        tree.setdefault("name", path.stem)
        cfg = _merge(cfg, tree, str(path))
    dotlist: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("+")
        _check_override_key(key)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        cfg = _merge(cfg, _nested(key, value), f"override '{item}'")
    obj: PretrainConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    _validate(obj)
    return obj


def _nested(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def to_dict(cfg: PretrainConfig) -> dict:
    """The config as a plain nested dict of primitives (for checkpoints: loads with weights_only)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: PretrainConfig) -> str:
    """The effective config as YAML (saved as ``config.yaml`` in the run directory)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: PretrainConfig, path: str | Path) -> None:
    """Write the effective config as YAML; it reloads with :func:`load_config`."""
    Path(path).write_text(to_yaml(cfg))


__all__ = ["ConfigError", "OptimConfig", "TrainConfig", "LogConfig", "PretrainConfig",
           "load_config", "save_config", "to_dict", "to_yaml"]
