"""The pretraining loader (docs/contracts.md, Data API): the PIL/torchvision path, and the switch
between it and the FFCV path (``data.loader``). Order, resume and bad-image accounting, shared with
the FFCV path, are in ``loader_base.py``."""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import cv2
import torch
from torch.utils.data import DataLoader

from .config import DataConfig
from .datasets import dataset_files
from .loader_base import EpochCursor, LoaderBase
from .two_view import TwoViewDataset


class _BatchSampler(EpochCursor):
    """Yields lists of ``(epoch, index)`` keys for the DataLoader's workers."""

    def __iter__(self):
        for b in self.batches():
            yield [(self.epoch, i) for i in b]

    def __len__(self) -> int:
        return max(0, len(self.order) - self.start)


def _worker_init(_: int) -> None:
    # Workers augment one sample at a time: intra-op threads would only oversubscribe the cores.
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


class PretrainLoader(LoaderBase):
    """PIL/torchvision two-view loader (batches on the CPU; the engine moves them)."""

    def __init__(self, cfg: DataConfig, batch_size: int, *, rank: int, world_size: int, seed: int,
                 device: torch.device, drop_last: bool = True):
        self.cfg = cfg
        self.files = dataset_files(cfg.dataset, cfg.root)
        super().__init__(len(self.files), batch_size, rank=rank, world_size=world_size, seed=seed,
                         drop_last=drop_last, max_bad_fraction=cfg.max_bad_fraction, name=lambda i: str(self.files[i]))
        self.dataset = TwoViewDataset(self.files, cfg, seed)
        self.sampler = _BatchSampler(self.order)
        nw = int(cfg.num_workers)
        self.loader = DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=nw,
            pin_memory=torch.device(device).type == "cuda", persistent_workers=nw > 0,
            worker_init_fn=_worker_init if nw > 0 else None, prefetch_factor=4 if nw > 0 else None,
        )

    def iter_from(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        """Iterate the current epoch from batch ``step`` on (exact resume inside an epoch)."""
        self.sampler.seek(self.epoch, step)
        for batch in self.loader:
            self.tracker.update(batch["index"], batch["skipped"])
            yield batch

    def close(self) -> None:
        """Shut the persistent worker processes down now (not at interpreter exit)."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None


def _checked(cfg) -> DataConfig:
    """A plain :class:`DataConfig` (an OmegaConf node is converted), with ranges checked."""
    if not isinstance(cfg, DataConfig):
        from omegaconf import OmegaConf

        cfg = DataConfig(**OmegaConf.to_container(cfg, resolve=True)) if OmegaConf.is_config(cfg) else DataConfig(**cfg)
    if not 0 < cfg.min_scale <= cfg.max_scale <= 1:
        raise ValueError(f"data.min_scale={cfg.min_scale}, data.max_scale={cfg.max_scale}: need 0 < min <= max <= 1")
    if not 0 <= cfg.min_overlap <= 1:
        raise ValueError(f"data.min_overlap={cfg.min_overlap} must lie in [0, 1]")
    for key in ("flip_p", "vflip_p"):
        if not 0 <= getattr(cfg, key) <= 1:
            raise ValueError(f"data.{key}={getattr(cfg, key)} must lie in [0, 1]")
    for key in ("blur_p", "solarize_p"):
        if len(getattr(cfg, key)) != 2:
            raise ValueError(f"data.{key} needs one probability per view, got {getattr(cfg, key)}")
    if len(cfg.color_jitter) != 4:
        raise ValueError(f"data.color_jitter needs (brightness, contrast, saturation, hue), got {cfg.color_jitter}")
    if cfg.image_size < 8:
        raise ValueError(f"data.image_size={cfg.image_size} is too small")
    return cfg


def build_pretrain_loader(cfg: DataConfig, batch_size: int, *, rank: int, world_size: int, seed: int,
                          device: torch.device, drop_last: bool = True):
    """The pretraining loader of docs/contracts.md: ``data.loader`` selects ``pil`` or ``ffcv``."""
    cfg = _checked(cfg)
    if cfg.loader == "pil":
        if cfg.dataset == "toy" and not (Path(cfg.root) / "meta.json").is_file():
            from .toy_scenes import make_toy_scenes

            make_toy_scenes(cfg.root, cfg.toy_n_train, cfg.toy_n_val, size=cfg.toy_size, seed=cfg.toy_seed)
        elif cfg.dataset == "toy":
            from .toy_scenes import stale_version_message

            msg = stale_version_message(cfg.root)
            if msg:  # a user's set may be deliberate: say so, do not overwrite it
                warnings.warn(msg, stacklevel=2)
        return PretrainLoader(cfg, batch_size, rank=rank, world_size=world_size, seed=seed, device=device,
                              drop_last=drop_last)
    if cfg.loader == "ffcv":
        from .ffcv_loader import FFCVPretrainLoader

        return FFCVPretrainLoader(cfg, batch_size, rank=rank, world_size=world_size, seed=seed, device=device,
                                  drop_last=drop_last)
    raise ValueError(f"data.loader={cfg.loader!r} is not one of ['pil', 'ffcv']")
