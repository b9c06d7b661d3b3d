"""What the PIL and the FFCV pretraining loaders share (docs/contracts.md, Data API): this rank's
epoch order with DistributedSampler semantics, exact resume inside an epoch, bad-image accounting,
and the loader interface built on them. Both loaders import this module; neither imports the other.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch


class EpochOrder:
    """This rank's sample order for an epoch, with ``torch.utils.data.DistributedSampler``
    semantics (shuffle with ``seed + epoch``, pad to a multiple of the world size, stride by
    rank), chunked into batches."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int, drop_last: bool):
        if n == 0:
            raise ValueError("empty dataset")
        # a numpy unsigned count (as FFCV's header gives) would make `index - skipped` wrap or overflow
        n = int(n)
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.drop_last = int(seed), drop_last
        self.num_samples = math.ceil(n / world_size)
        if drop_last and self.num_samples < batch_size:
            raise ValueError(f"{n} images over {world_size} rank(s) give {self.num_samples} per rank, fewer than "
                             f"the per-rank batch size {batch_size}: an epoch would have no step")

    def indices(self, epoch: int) -> list[int]:
        """This rank's ``num_samples`` dataset indices of ``epoch``, in order."""
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
        """The batches of ``epoch`` from batch ``start`` on (a resumed epoch skips the first ones)."""
        idx = self.indices(epoch)
        out = [idx[k:k + self.batch_size] for k in range(0, len(idx), self.batch_size)]
        return out[start:len(self)]


class EpochCursor:
    """The epoch and first batch the next iteration starts from; the loaders' samplers read it at
    each ``iter`` (so persistent workers follow ``set_epoch`` and ``iter_from``)."""

    def __init__(self, order: EpochOrder):
        self.order, self.epoch, self.start = order, 0, 0

    def seek(self, epoch: int, start: int) -> None:
        """Start the next iteration at batch ``start`` of ``epoch``."""
        self.epoch, self.start = int(epoch), int(start)

    def batches(self) -> list[list[int]]:
        """The batches the next iteration yields."""
        return self.order.batches(self.epoch, self.start)


class TooManyBadImages(RuntimeError):
    """More distinct undecodable files than ``data.max_bad_fraction`` allows."""


class BadImageTracker:
    """Counts decode failures and stops the run when too many distinct files are undecodable.

    Standalone it raises :class:`TooManyBadImages` from :meth:`update`. Under the trainer (``deferred``)
    it only records :attr:`error`: a rank that raised alone would leave the others waiting in the step's
    collectives, so the trainer agrees on the flag in its one all-reduce and every rank stops together.
    """

    def __init__(self, n: int, name: Callable[[int], str], max_bad_fraction: float, per_rank: int):
        n = int(n)  # see EpochOrder
        self.n, self.name, self.max_bad_fraction, self.per_rank = n, name, max_bad_fraction, per_rank
        self.bad_images = 0
        self.bad_files: set[int] = set()
        self.deferred = False
        self.error: str | None = None

    def update(self, index: torch.Tensor, skipped: torch.Tensor) -> None:
        """Account a batch's ``skipped`` counts (host tensors); past ``max_bad_fraction`` record
        :attr:`error`, and raise it unless :attr:`deferred`."""
        s = int(skipped.sum())
        if s == 0:
            return
        self.bad_images += s
        n = self.n
        # a sample with `skipped = k` and source index u had u-1, ..., u-k fail
        for u, k in zip(index.tolist(), skipped.tolist()):
            self.bad_files.update((u - d) % n for d in range(1, k + 1))
        if self.error is None and len(self.bad_files) > self.max_bad_fraction * self.per_rank:
            examples = ", ".join(self.name(i) for i in sorted(self.bad_files)[:5])
            self.error = (f"{len(self.bad_files)} undecodable images among the {self.per_rank} of this rank exceed "
                          f"data.max_bad_fraction={self.max_bad_fraction}; e.g. {examples}")
        if self.error is not None and not self.deferred:
            raise TooManyBadImages(self.error)


class LoaderBase:
    """The pretraining loader interface (docs/contracts.md): ``len``, ``set_epoch``, ``iter_from``,
    iteration, ``bad_images`` and ``close``, over this rank's :class:`EpochOrder` of ``n`` samples.

    ``name(i)`` names sample ``i`` in the error about too many undecodable images.
    """

    def __init__(self, n: int, batch_size: int, *, rank: int, world_size: int, seed: int, drop_last: bool,
                 max_bad_fraction: float, name: Callable[[int], str]):
        self.order = EpochOrder(n, batch_size, rank, world_size, seed, drop_last)
        self.tracker = BadImageTracker(n, name, max_bad_fraction, self.order.num_samples)
        self.epoch = 0

    @property
    def bad_images(self) -> int:
        """Decode failures seen so far on this rank."""
        return self.tracker.bad_images

    @property
    def bad_image_error(self) -> str | None:
        """Why this rank's undecodable images exceed ``data.max_bad_fraction`` (``None``: they do not)."""
        return self.tracker.error

    def defer_bad_image_error(self) -> None:
        """Record the bad-image limit instead of raising it; the caller agrees on it across ranks."""
        self.tracker.deferred = True

    def __len__(self) -> int:
        return len(self.order)

    def set_epoch(self, epoch: int) -> None:
        """Iterate ``epoch`` next (its order and augmentations depend on it)."""
        self.epoch = int(epoch)

    def iter_from(self, step: int) -> Iterator[dict[str, torch.Tensor]]:  # pragma: no cover - abstract
        """Iterate the current epoch from batch ``step`` on (exact resume inside an epoch)."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.iter_from(0)

    def close(self) -> None:
        """Release workers or threads now (not at interpreter exit)."""


__all__ = ["EpochOrder", "EpochCursor", "BadImageTracker", "TooManyBadImages", "LoaderBase"]
