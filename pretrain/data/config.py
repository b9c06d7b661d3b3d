"""Typed configuration of the pretraining data pipeline (the ``data:`` section of a pretrain YAML).

:data:`DATA_RULES` and :func:`data_problems` are every rule of the section; ``load_config`` checks
them before anything is built (``python -m pretrain`` exits 64 on the first broken one).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from pretrain.config_rules import (NON_EMPTY, NON_NEGATIVE, PROBABILITY, Choice, Problem, Rule, at_least,
                                   check_fields, entries, interval)


class Dataset(Choice):
    """``data.dataset``: the folder layout under ``data.root`` (``pretrain.data.datasets``)."""

    toy = "toy"
    coco = "coco"
    cocoplus = "cocoplus"
    imagenet = "imagenet"
    folder = "folder"


class Loader(Choice):
    """``data.loader``: decode with PIL in DataLoader workers, or read an FFCV ``.beton``."""

    pil = "pil"
    ffcv = "ffcv"


@dataclass
class DataConfig:
    """Dataset, loader and two-view augmentations (SlotCon Sec. 4.1, BYOL's augmentations)."""

    dataset: Dataset = Dataset.toy
    root: str = "data/toy_scenes"
    loader: Loader = Loader.pil
    ffcv_path: str = ""  # .beton written by tools/make_ffcv.py (loader=ffcv)
    image_size: int = 224
    min_scale: float = 0.08
    max_scale: float = 1.0
    min_overlap: float = 0.01  # fraction of view 2's area that must lie inside view 1 (DESIGN.md)
    flip_p: float = 0.5
    # Vertical flips: 0 for natural images (they have an up); the toy scenes have none, and without
    # them vertical position is a cue that survives every augmentation (a shortcut for the grouping).
    vflip_p: float = 0.0
    color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: list[float] = field(default_factory=lambda: [1.0, 0.1])
    solarize_p: list[float] = field(default_factory=lambda: [0.0, 0.2])
    num_workers: int = 2
    max_bad_fraction: float = 0.01  # more undecodable images than this stops the run
    # dataset=toy with loader=pil: the toy scenes are generated at `root` if meta.json is missing
    toy_n_train: int = 256
    toy_n_val: int = 64
    toy_size: int = 128
    toy_seed: int = 0


DATA_RULES: dict[str, Rule] = {
    "root": NON_EMPTY,
    # The loader's floor: below 8 pixels a crop holds too little for even one feature-map cell.
    "image_size": at_least(8),
    "min_scale": interval("(0, 1]"),
    "max_scale": interval("(0, 1]"),
    # 1 would ask for view 2 inside view 1, which the sampler almost never draws: it would fall
    # back to two identical crops and the views would no longer differ in geometry.
    "min_overlap": interval("[0, 1)"),
    "flip_p": PROBABILITY,
    "vflip_p": PROBABILITY,
    "color_jitter": entries(NON_NEGATIVE, 4, "brightness, contrast, saturation, hue"),
    "color_jitter_p": PROBABILITY,
    "grayscale_p": PROBABILITY,
    "blur_p": entries(PROBABILITY, 2, "one per view"),
    "solarize_p": entries(PROBABILITY, 2, "one per view"),
    "num_workers": NON_NEGATIVE,
    "max_bad_fraction": PROBABILITY,
    "toy_n_train": at_least(1),
    "toy_n_val": at_least(1),
    "toy_size": at_least(1),
    "toy_seed": interval(f"[0, {2**32})"),  # numpy generators refuse negative seeds
}


def data_problems(cfg: DataConfig) -> Iterator[Problem]:
    """Every broken rule of the ``data`` section: :data:`DATA_RULES`, then those across fields."""
    yield from check_fields(cfg, "data", DATA_RULES)
    if cfg.min_scale > cfg.max_scale:
        yield Problem("data.min_scale", cfg.min_scale, f"<= data.max_scale ({cfg.max_scale})")
    # A hue shift is a fraction of a turn: +-0.5 already reaches every hue (torchvision's bound).
    if len(cfg.color_jitter) == 4 and cfg.color_jitter[3] > 0.5:
        yield Problem("data.color_jitter", cfg.color_jitter, "a list whose hue entry (the 4th) is <= 0.5")
    if cfg.loader == Loader.ffcv and not cfg.ffcv_path.strip():
        yield Problem("data.ffcv_path", cfg.ffcv_path,
                      "set when data.loader=ffcv (a .beton written by tools/make_ffcv.py)")


__all__ = ["Dataset", "Loader", "DataConfig", "DATA_RULES", "data_problems"]
