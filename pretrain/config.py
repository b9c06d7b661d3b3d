"""Typed configuration of a pretraining run: YAML file + ``key=value`` overrides -> dataclasses.

The YAML under ``configs/pretrain/`` is merged onto the structured schema below (OmegaConf
structured configs), then the command-line overrides are merged on top. Any unknown key or a
value of the wrong type is a :class:`ConfigError` that names the full key and lists the valid
keys of its section, so a typo never silently falls back to a default.

Then every value is checked (:func:`validate`): no float may be NaN or infinite, and each
section's rule table (ranges, choices, list lengths) and its rules across fields must hold. The
first broken rule is a :class:`ConfigError` naming the key, what it accepts and the value found,
so ``python -m pretrain`` exits 64 before it builds a model or a loader.

Sections: ``data`` (:class:`pretrain.data.config.DataConfig`), ``model``
(:class:`pretrain.methods.config.ModelConfig`), ``optim``, ``train``, ``log`` (below) and ``eval``
(:class:`pretrain.eval.config.EvalConfig`, the online evaluation).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.config_rules import (NON_EMPTY, NON_NEGATIVE, POSITIVE, Choice, Problem, Rule, at_least,
                                   check_fields, choice_enum, interval, non_finite)
from pretrain.data.config import DataConfig, data_problems
from pretrain.engine.precision import AMP_CHOICES
from pretrain.engine.schedules import peak_lr
from pretrain.eval.config import EvalConfig, eval_problems
from pretrain.methods.config import ModelConfig, model_problems


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


class OptimName(Choice):
    """``optim.name``: LARS (SlotCon's), momentum SGD or AdamW (DINO's)."""

    lars = "lars"
    sgd = "sgd"
    adamw = "adamw"


class Device(Choice):
    """``train.device``: ``auto`` is the local GPU where CUDA is available, else the CPU."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


# The precision module owns the choices (it resolves them); the enum only lets OmegaConf check them.
Amp = choice_enum("Amp", AMP_CHOICES, __name__)


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (SlotCon Sec. 4.1; recipe details in DESIGN.md)."""

    name: OptimName = OptimName.lars
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
    device: Device = Device.auto
    # auto: bf16 where the hardware computes it, fp16 on other GPUs, none on other CPUs | none | bf16 | fp16
    amp: Amp = Amp.auto  # type: ignore[valid-type]
    channels_last: bool = True
    compile: bool = False  # torch.compile the method
    deterministic: bool = False  # deterministic algorithms (exact resume checks; slower)
    checkpoint_every_steps: int = 1000  # 0: only at epoch end
    keep_last: int = 3
    output_dir: str = "runs"
    run_dir: str = ""  # explicit run directory; default output_dir/<name>
    resume: str = "auto"  # auto (newest loadable checkpoint in the run dir) | none | <path>
    # Keys (e.g. optim.base_lr) or sections a resume may change although they change the run's trajectory;
    # any other such change is refused (pretrain.engine.rundir.FREE_KEYS may always change).
    allow_config_change: list[str] = field(default_factory=list)
    export_backbone: bool = True  # write teacher_backbone.pth at the end


@dataclass
class LogConfig:
    """TensorBoard, text log and progress bar."""

    every_steps: int = 20
    image_every_steps: int = 500  # slot-assignment pictures; 0 disables
    num_images: int = 4
    tensorboard: bool = True
    # auto: a bar only when stdout is a terminal; in a file (a SLURM log) its carriage returns would
    # pile up, and the every_steps log lines say the same. true/false force it. A string, not a bool:
    # OmegaConf stores YAML's true/false here as "True"/"False".
    progress_bar: str = "auto"


@dataclass
class PretrainConfig:
    """A whole pretraining run."""

    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


OPTIM_RULES: dict[str, Rule] = {
    "base_lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    # The heavy-ball (and AdamW's first-moment) average diverges at 1: the step never decays.
    "momentum": interval("[0, 1)"),
    "lars_eta": POSITIVE,
    "warmup_epochs": NON_NEGATIVE,
    "min_lr": NON_NEGATIVE,
    "batch_size": at_least(1),
    "clip_grad": NON_NEGATIVE,  # 0 disables clipping
}

TRAIN_RULES: dict[str, Rule] = {
    "epochs": at_least(1),
    "max_steps": NON_NEGATIVE,  # 0: run all epochs
    # numpy refuses negative seeds, and seed_everything reduces numpy's seed mod 2**32: a larger one
    # would silently repeat a smaller one's run.
    "seed": interval(f"[0, {2**32})"),
    "checkpoint_every_steps": NON_NEGATIVE,  # 0: only at epoch end
    "keep_last": at_least(1),
    "resume": NON_EMPTY,  # auto | none | a checkpoint path
    "allow_config_change": Rule(
        "a list of config keys or sections, e.g. [optim.base_lr, train.epochs]",
        lambda v: isinstance(v, list) and all(
            isinstance(k, str) and k.split(".")[0] in {f.name for f in dataclasses.fields(PretrainConfig)}
            for k in v)),
}

PROGRESS_BAR_CHOICES = ("auto", "true", "false")

LOG_RULES: dict[str, Rule] = {
    "every_steps": NON_NEGATIVE,
    "image_every_steps": NON_NEGATIVE,  # 0 disables the pictures
    "progress_bar": Rule("one of auto, true, false", lambda v: str(v).lower() in PROGRESS_BAR_CHOICES),
}


def optim_problems(o: OptimConfig) -> Iterator[Problem]:
    """Every broken rule of the ``optim`` section (its warm-up against ``train.epochs``: :func:`problems`)."""
    yield from check_fields(o, "optim", OPTIM_RULES)
    peak = peak_lr(o.base_lr, o.batch_size, o.scale_lr)
    if o.min_lr > peak:  # the cosine would climb from the peak instead of decaying to min_lr
        scaled = " (optim.base_lr x optim.batch_size / 256)" if o.scale_lr else ""
        yield Problem("optim.min_lr", o.min_lr, f"<= the peak learning rate {peak:.6g}{scaled}")


def train_problems(t: TrainConfig) -> Iterator[Problem]:
    """Every broken rule of the ``train`` section."""
    yield from check_fields(t, "train", TRAIN_RULES)


def log_problems(lc: LogConfig) -> Iterator[Problem]:
    """Every broken rule of the ``log`` section."""
    yield from check_fields(lc, "log", LOG_RULES)
    if lc.image_every_steps > 0 and lc.tensorboard and lc.num_images < 1:
        yield Problem("log.num_images", lc.num_images, ">= 1 when pictures are on (log.image_every_steps > 0)")


def _across_sections(cfg: PretrainConfig) -> Iterator[Problem]:
    if cfg.optim.warmup_epochs > cfg.train.epochs:
        yield Problem("optim.warmup_epochs", cfg.optim.warmup_epochs, f"<= train.epochs ({cfg.train.epochs})")
    # last: it reads data.root, which must be valid first
    yield from eval_problems(cfg.eval, cfg.data)


def problems(cfg: PretrainConfig) -> Iterator[Problem]:
    """Every broken rule of a whole config, in order: non-finite floats anywhere, the run's name, the
    sections ``data``, ``model``, ``optim``, ``train``, ``log``, then the rules that relate sections, ``eval``'s
    among them since its split lives under ``data.root`` (last, so that an error names the field that is out
    of range rather than its partner)."""
    return chain(
        non_finite(cfg),
        check_fields(cfg, "", {"name": NON_EMPTY}),
        data_problems(cfg.data),
        model_problems(cfg.model),
        optim_problems(cfg.optim),
        train_problems(cfg.train),
        log_problems(cfg.log),
        _across_sections(cfg),
    )


def validate(cfg: PretrainConfig) -> None:
    """Raise :class:`ConfigError` for the first broken rule of ``cfg`` (see :func:`problems`)."""
    for problem in problems(cfg):
        raise ConfigError(problem.message())


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
    validate(obj)
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
    """The config as a plain nested dict of primitives (for checkpoints: loads with weights_only).

    Choices become their string values: ``torch.load(weights_only=True)`` refuses enum members.
    """
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)  # type: ignore[return-value]


def to_yaml(cfg: PretrainConfig) -> str:
    """The effective config as YAML (saved as ``config.yaml`` in the run directory)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: PretrainConfig, path: str | Path) -> None:
    """Write the effective config as YAML; it reloads with :func:`load_config`."""
    Path(path).write_text(to_yaml(cfg))


__all__ = ["ConfigError", "OptimName", "Device", "Amp", "OptimConfig", "TrainConfig", "LogConfig", "EvalConfig", "PretrainConfig",
           "OPTIM_RULES", "TRAIN_RULES", "LOG_RULES", "PROGRESS_BAR_CHOICES", "problems", "validate", "load_config", "save_config", "to_dict",
           "to_yaml"]
