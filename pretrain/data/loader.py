"""The pretraining loader (docs/contracts.md, Data API): distributed order, resume, bad-image
accounting, and the switch between the PIL path and the FFCV path (``data.loader``)."""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import torch
from torch.utils.data import DataLoader

from .config import DataConfig
from .datasets import dataset_files
from .two_view import TwoViewDataset


class EpochOrder:
    """This rank's sample order for an epoch, with ``torch.utils.data.DistributedSampler``
    semantics (shuffle with ``seed + epoch``, pad to a multiple of the world size, stride by
    rank), chunked into batches."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int, drop_last: bool):
        if n == 0:
            raise ValueError("empty dataset")
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.drop_last = int(seed), drop_last
        self.num_samples = math.ceil(n / world_size)
        if drop_last and self.num_samples < batch_size:
            raise ValueError(f"{n} images over {world_size} rank(s) give {self.num_samples} per rank, fewer than "
                             f"the per-rank batch size {batch_size}: an epoch would have no step")

    def indices(self, epoch: int) -> list[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        total = self.num_samples * self.world_size
        perm += (perm * math.ceil(total / self.n))[: total - self.n]
        return perm[self.rank:total:self.world_size]

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def batches(self, epoch: int, start: int = 0) -> list[list[int]]:
        idx = self.indices(epoch)
        out = [idx[k:k + self.batch_size] for k in range(0, len(idx), self.batch_size)]
        return out[start:len(self)]


class _BatchSampler:
    """Yields lists of ``(epoch, index)`` keys; re-read at each ``iter`` so that persistent
    workers follow ``set_epoch`` and ``iter_from``."""

    def __init__(self, order: EpochOrder):
        self.order, self.epoch, self.start = order, 0, 0

    def __iter__(self):
        for b in self.order.batches(self.epoch, self.start):
            yield [(self.epoch, i) for i in b]

    def __len__(self) -> int:
        return max(0, len(self.order) - self.start)


def _worker_init(_: int) -> None:
    # Workers augment one sample at a time: intra-op threads would only oversubscribe the cores.
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


class BadImageTracker:
    """Counts decode failures and stops the run when too many distinct files are undecodable."""

    def __init__(self, n: int, name: Callable[[int], str], max_bad_fraction: float, per_rank: int):
        self.n, self.name, self.max_bad_fraction, self.per_rank = n, name, max_bad_fraction, per_rank
        self.bad_images = 0
        self.bad_files: set[int] = set()

    def update(self, index: torch.Tensor, skipped: torch.Tensor) -> None:
        s = int(skipped.sum())
        if s == 0:
            return
        self.bad_images += s
        n = self.n
        # a sample with `skipped = k` and source index u had u-1, ..., u-k fail
        for u, k in zip(index.tolist(), skipped.tolist()):
            self.bad_files.update((u - d) % n for d in range(1, k + 1))
        if len(self.bad_files) > self.max_bad_fraction * self.per_rank:
            examples = ", ".join(self.name(i) for i in sorted(self.bad_files)[:5])
            raise RuntimeError(
                f"{len(self.bad_files)} undecodable images among the {self.per_rank} of this rank exceed "
                f"data.max_bad_fraction={self.max_bad_fraction}; e.g. {examples}")


class PretrainLoader:
    """PIL/torchvision two-view loader (batches on the CPU; the engine moves them)."""

    def __init__(self, cfg: DataConfig, batch_size: int, *, rank: int, world_size: int, seed: int,
                 device: torch.device, drop_last: bool = True):
        self.cfg = cfg
        self.files = dataset_files(cfg.dataset, cfg.root)
        self.dataset = TwoViewDataset(self.files, cfg, seed)
        self.order = EpochOrder(len(self.files), batch_size, rank, world_size, seed, drop_last)
        self.sampler = _BatchSampler(self.order)
        self.tracker = BadImageTracker(len(self.files), lambda i: str(self.files[i]), cfg.max_bad_fraction, self.order.num_samples)
        nw = int(cfg.num_workers)
        self.loader = DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=nw,
            pin_memory=torch.device(device).type == "cuda", persistent_workers=nw > 0,
            worker_init_fn=_worker_init if nw > 0 else None, prefetch_factor=4 if nw > 0 else None,
        )
        self.epoch = 0

    @property
    def bad_images(self) -> int:
        return self.tracker.bad_images

    def __len__(self) -> int:
        return len(self.order)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def iter_from(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        """Iterate the current epoch from batch ``step`` on (exact resume inside an epoch)."""
        self.sampler.epoch, self.sampler.start = self.epoch, int(step)
        for batch in self.loader:
            self.tracker.update(batch["index"], batch["skipped"])
            yield batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.iter_from(0)

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
