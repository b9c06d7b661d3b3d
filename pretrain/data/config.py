"""Typed configuration of the pretraining data pipeline (the ``data:`` section of a pretrain YAML)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    dataset: str = "toy"  # toy | coco | cocoplus | imagenet | folder
    root: str = "data/toy_scenes"
    loader: str = "pil"  # pil | ffcv
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
