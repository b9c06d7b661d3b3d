"""Online object-centric evaluation: the teacher's held-out scores, computed during pretraining.

One pass over a held-out split (:class:`pretrain.eval.datasets.HeldOutSplit`) scores, with the
project's metrics (:mod:`pretrain.eval.metrics`):

* unsupervised semantic segmentation (SlotCon Sec. 4.4): the per-pixel argmax prototype, upsampled
  bilinearly to the label resolution, Hungarian-matched once over the whole split to the classes;
  ``miou`` and ``pacc`` (percent);
* object discovery: ``ari_fg`` (ARI on foreground pixels, Slot Attention Sec. 5.9) and ``mbo`` (mean
  best overlap of each object with a hard group), both percent, mean over images with objects;
* prototype health: ``dead_prototypes`` (prototypes that win no pixel of the split at label
  resolution), ``entropy`` (mean per-pixel entropy of the soft assignment over K, nats, at feature
  resolution: the same quantity as the training diagnostic, without the centre) and ``active_slots``
  (mean number of prototypes per image that win a feature-map pixel: SlotCon's Eq. 5 active mask).

Distributed: every rank scores the images ``rank, rank + world, ...``; the statistics go through
ONE all-reduce of a flat float64 tensor (the K x C confusion matrix, K pixel-win counts, and per-image
vectors of length N holding each image's value at its own index, zero elsewhere). Adding zeros is exact,
so the per-image values every rank ends up with, and the means taken from them with ``math.fsum``,
are bit-for-bit those of one process evaluating the whole split (with the same batch composition).

Nothing here changes the run it observes: :func:`evaluate_teacher` keeps every RNG stream (Python,
NumPy, torch CPU and CUDA), puts the method in eval mode (BN uses its running statistics and updates
nothing) and restores each module's mode, and runs under ``torch.no_grad``.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from pretrain.losses.slot_contrast import active_mask

from .datasets import HeldOutSplit, collate_held_out
from .inference import assign_batch
from .metrics import IGNORE_INDEX, ari_fg, best_overlap, confusion_matrix, matched_scores
from .visualize import hard_labels, overlay_assignments

#: Per-image quantities, each a length-N vector in the all-reduced tensor (``*_n``: 1 where defined).
PER_IMAGE = ("ari", "ari_n", "mbo", "mbo_n", "entropy", "active", "seen")


@dataclass
class OnlineStats:
    """This rank's sums over its shard of a split of ``num_images`` images, K groups and C classes."""

    num_groups: int
    num_classes: int
    num_images: int
    confusion: np.ndarray = field(init=False)
    wins: np.ndarray = field(init=False)
    per_image: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.confusion = np.zeros((self.num_groups, self.num_classes), dtype=np.int64)
        self.wins = np.zeros(self.num_groups, dtype=np.int64)
        self.per_image = {k: np.zeros(self.num_images, dtype=np.float64) for k in PER_IMAGE}

    def flat(self) -> Tensor:
        """Everything as one float64 vector (counts stay exact below 2**53)."""
        parts = [self.confusion.reshape(-1), self.wins] + [self.per_image[k] for k in PER_IMAGE]
        return torch.from_numpy(np.concatenate([p.astype(np.float64) for p in parts]))

    def load_flat(self, vec: Tensor) -> None:
        """The inverse of :meth:`flat` (after the all-reduce)."""
        v = vec.cpu().numpy()
        k, c, n = self.num_groups, self.num_classes, self.num_images
        self.confusion = np.rint(v[:k * c]).astype(np.int64).reshape(k, c)
        self.wins = np.rint(v[k * c:k * c + k]).astype(np.int64)
        at = k * c + k
        for name in PER_IMAGE:
            self.per_image[name] = v[at:at + n].copy()
            at += n


def accumulate(stats: OnlineStats, assign: Tensor, semantic: Tensor | None, instances: Tensor | None,
               index: Tensor, size: tuple[int, int]) -> None:
    """Add one batch: ``assign`` ``(B,K,h,w)`` soft assignment; ``semantic`` / ``instances`` ``(B,H,W)``
    (``None`` where the split has none); ``index`` ``(B,)`` the images' positions in the split; ``size``
    the label (= image) resolution ``(H, W)`` the hard groups are taken at."""
    k = stats.num_groups
    if assign.shape[1] != k:
        raise ValueError(f"assignment has {assign.shape[1]} groups, expected {k}")
    pred = hard_labels(assign, size)  # (B,H,W): bilinear upsampling before the argmax (Sec. 4.4)
    stats.wins += np.bincount(pred.reshape(-1).cpu().numpy(), minlength=k)[:k]
    if semantic is not None and stats.num_classes:
        stats.confusion += confusion_matrix(pred, semantic, k, stats.num_classes, IGNORE_INDEX)
    a = assign.float()
    entropy = -(a * a.clamp_min(1e-12).log()).sum(dim=1).flatten(1).mean(dim=1)  # (B,) nats
    active = active_mask(a).sum(dim=1)  # (B,)
    idx = index.cpu().numpy()
    pi = stats.per_image
    pi["entropy"][idx] = entropy.double().cpu().numpy()
    pi["active"][idx] = active.double().cpu().numpy()
    pi["seen"][idx] = 1.0
    if instances is not None:
        inst, p = instances.cpu(), pred.cpu()
        for j, (t, q) in enumerate(zip(inst, p)):
            ari = ari_fg(t[None], q[None])[0]
            mbo = best_overlap(t, q)
            if not math.isnan(ari):
                pi["ari"][idx[j]], pi["ari_n"][idx[j]] = ari, 1.0
            if not math.isnan(mbo):
                pi["mbo"][idx[j]], pi["mbo_n"][idx[j]] = mbo, 1.0


def all_reduce_stats(stats: OnlineStats, device: torch.device) -> None:
    """Sum ``stats`` over ranks in ONE all-reduce (a no-op in a single process); on ``device``, the run's
    (NCCL reduces CUDA tensors only)."""
    from pretrain.engine.distributed import all_reduce

    stats.load_flat(all_reduce(stats.flat().to(device)))


def _mean(values: np.ndarray, defined: np.ndarray) -> float | None:
    vals = values[defined > 0]
    return math.fsum(vals.tolist()) / len(vals) if len(vals) else None


def summarize(stats: OnlineStats, has_semantic: bool, has_instances: bool) -> dict:
    """The split's figures from reduced statistics; ``None`` where the split cannot give one."""
    pi = stats.per_image
    seen = pi["seen"]
    out: dict = {"num_images": int(seen.sum()), "miou": None, "pacc": None, "ari_fg": None, "mbo": None}
    if has_semantic and stats.num_classes and stats.confusion.sum() > 0:
        r = matched_scores(stats.confusion)
        out["miou"], out["pacc"] = 100.0 * r["miou"], 100.0 * r["pacc"]
    if has_instances:
        ari, mbo = _mean(pi["ari"], pi["ari_n"]), _mean(pi["mbo"], pi["mbo_n"])
        out["ari_fg"] = None if ari is None else 100.0 * ari
        out["mbo"] = None if mbo is None else 100.0 * mbo
    out["dead_prototypes"] = int((stats.wins == 0).sum())
    out["entropy"] = _mean(pi["entropy"], seen)
    out["active_slots"] = _mean(pi["active"], seen)
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Every RNG stream as it was before: Python, NumPy, torch's CPU and CUDA generators (a DataLoader draws
    its base seed from torch's generator even with no worker); the checkpoint's own capture of them."""
    from pretrain.engine.checkpoint import rng_state, set_rng_state

    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode; afterwards every submodule back in the mode it had (not just the root's)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def evaluate_online(method: nn.Module, dataset: HeldOutSplit, num_groups: int, *, batch_size: int = 16,
                    device: torch.device | None = None, amp_dtype: torch.dtype | None = None, rank: int = 0,
                    world_size: int = 1, num_workers: int = 0, picture_images: int = 0) -> tuple[dict, Tensor | None]:
    """Score ``method.assign`` on this rank's shard of ``dataset`` and reduce over ranks.

    Every rank must call it (the all-reduce); every rank returns the same figures (:func:`summarize`).
    ``amp_dtype``: autocast to it (the run's training precision: on a CPU with native bfloat16 it halves
    the evaluation's time); ``None``: float32. The picture (rank 0,
    ``picture_images`` > 0) is the first held-out images with their argmax groups overlaid, ``(n,3,H,W)``.
    The method is used as it is: see :func:`evaluate_teacher` for the guards a training run needs.
    """
    device = device or torch.device("cpu")
    shard = Subset(dataset, list(range(rank, len(dataset), world_size)))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_held_out, pin_memory=device.type == "cuda")
    stats = OnlineStats(num_groups, dataset.num_classes if dataset.has_semantic else 0, len(dataset))
    picture: list[Tensor] = []
    want = picture_images if rank == 0 else 0
    cast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else nullcontext
    for batch in loader:
        with cast():
            a = assign_batch(method, batch["image"], device, amp=False)
        accumulate(stats, a, batch["semantic"] if dataset.has_semantic else None,
                   batch["instances"] if dataset.has_instances else None, batch["index"],
                   tuple(batch["image"].shape[-2:]))
        have = sum(p.shape[0] for p in picture)
        if have < want:
            n = want - have
            picture.append(overlay_assignments(batch["image"][:n], a[:n].cpu()))
    all_reduce_stats(stats, device)
    result = summarize(stats, dataset.has_semantic, dataset.has_instances)
    return result, (torch.cat(picture) if picture else None)


def evaluate_teacher(method: nn.Module, dataset: HeldOutSplit, num_groups: int, **kwargs) -> tuple[dict, Tensor | None]:
    """:func:`evaluate_online` for a method that is training: RNG streams kept (:func:`preserved_rng`),
    eval mode with every module's mode restored (:func:`eval_mode`), no autograd. The teacher's EMA
    state and SlotCon's centre are buffers that ``assign`` only reads."""
    with preserved_rng(), eval_mode(method), torch.no_grad():
        return evaluate_online(method, dataset, num_groups, **kwargs)


def evaluate_random_init(run_dir, device: torch.device | None = None) -> dict:
    """The run's held-out figures at random initialisation: the teacher as ``train.seed`` built it before any
    step (:func:`pretrain.eval.inference.load_method` with ``random_init=True``), on the run's own ``eval``
    split and settings (its ``config.yaml``) and in its precision on ``device``. The baseline of the curves
    (:mod:`pretrain.eval.curves`)."""
    from pathlib import Path

    from pretrain.config import load_config
    from pretrain.engine.precision import amp_dtype as dtype_of, resolve_amp

    from .config import resolve_split
    from .inference import load_method

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    device = device or torch.device("cpu")
    method, _ = load_method(run_dir, device, random_init=True)
    ev = cfg.eval
    dataset = HeldOutSplit(resolve_split(ev.split, cfg.data.root), ev.resolution, ev.max_images)
    result, _ = evaluate_teacher(method, dataset, cfg.model.num_prototypes, batch_size=ev.batch_size,
                                 device=device, num_workers=ev.num_workers,
                                 amp_dtype=dtype_of(resolve_amp(cfg.train.amp, device)))
    return result


__all__ = ["PER_IMAGE", "OnlineStats", "accumulate", "all_reduce_stats", "summarize", "preserved_rng", "eval_mode",
           "evaluate_online", "evaluate_teacher", "evaluate_random_init"]
