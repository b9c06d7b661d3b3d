"""Hungarian-matched object losses (Baldassarre & Azizpour; paper 000, Sec. 2.2, Eq. 2-3).

The object tokens of two views of an image have no predetermined correspondence; a bipartite
matching ``σ`` between them (Hungarian algorithm on detached cosine similarities) supplies each
token's positive. Three variants of the loss for a token ``(a, b, i)`` (view a, image b, slot i):

- ``ctr_all`` (Eq. 2 with N^ALL): InfoNCE against every token of every image in the (global) batch;
- ``ctr_img`` (Eq. 2 with N^IMG): InfoNCE against the tokens of the two views of image b only;
- ``cossim``  (Eq. 3): negative cosine similarity to the stop-gradient matched target.

All functions take the queries ``q_a`` (the side that learns) and the keys ``k_a`` of both views
separately, so the same code serves the paper's siamese form (``k = q``) and the student/EMA-teacher
form of this project (``q`` = student predictions, ``k`` = teacher projections). The global loss of
Eq. 1 is the ``ctr_all`` case with one token per image (``pretrain/losses/global_contrast.py``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .gather import concat_all_gather, get_rank, get_world_size

OBJECT_LOSSES = ("ctr_all", "ctr_img", "cossim")


@torch.no_grad()
def hungarian_match(sim: Tensor) -> Tensor:
    """Maximum-similarity bipartite matching for a batch of square problems.

    ``sim``: ``(N, S, S)``; returns ``(N, S)`` int64 with ``perm[n, i] = j``: row i is matched to
    column j. The whole batch crosses to the CPU in one transfer; only the scipy call loops.
    """
    if sim.dim() != 3 or sim.shape[1] != sim.shape[2]:
        raise ValueError(f"hungarian_match: expected (N, S, S) similarities, got {tuple(sim.shape)}")
    n, s, _ = sim.shape
    cost = sim.detach().float().cpu().numpy()
    if not np.isfinite(cost).all():
        raise ValueError("hungarian_match: similarities contain NaN or inf")
    perm = np.empty((n, s), dtype=np.int64)
    for i in range(n):
        rows, cols = linear_sum_assignment(cost[i], maximize=True)
        perm[i, rows] = cols
    return torch.from_numpy(perm).to(sim.device, non_blocking=True)


@torch.no_grad()
def match_slots(x: Tensor, y: Tensor) -> Tensor:
    """Hungarian matching ``σ`` of Eq. 2 between two slot sets per image by cosine similarity.

    ``x``, ``y``: ``(B, S, D)``; returns ``(B, S)`` int64, ``y[b, σ[b, i]]`` is the match of ``x[b, i]``.
    """
    if x.shape != y.shape or x.dim() != 3:
        raise ValueError(f"match_slots: expected two (B, S, D) tensors, got {tuple(x.shape)} and {tuple(y.shape)}")
    # float32 similarities: under autocast the einsum's bmm would round them to half precision,
    # and near-ties of the matching would flip on rounding noise.
    with torch.autocast(x.device.type, enabled=False):
        sim = torch.einsum("bid,bjd->bij", F.normalize(x.float(), dim=-1), F.normalize(y.float(), dim=-1))
    return hungarian_match(sim)


def _positives(perm12: Tensor, perm21: Tensor, b: int, s: int) -> Tensor:
    """Flat index ``ā·B·S + b·S + σ_a(b, i)`` of each query's positive key, shape ``(2, B, S)``."""
    img = torch.arange(b, device=perm12.device).view(b, 1) * s
    return torch.stack([b * s + img + perm12, img + perm21])


def _check(q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, perm12: Tensor, perm21: Tensor) -> None:
    b, s = q1.shape[:2]
    if q1.dim() != 3 or not (q1.shape == q2.shape and k1.shape[:2] == (b, s) and k2.shape[:2] == (b, s)):
        raise ValueError(
            f"object loss: queries/keys must be (B, S, D) alike, got {tuple(q1.shape)}, {tuple(q2.shape)}, "
            f"{tuple(k1.shape)}, {tuple(k2.shape)}"
        )
    if perm12.shape != (b, s) or perm21.shape != (b, s):
        raise ValueError(f"object loss: matchings must be (B, S) = {(b, s)}, got {tuple(perm12.shape)}, {tuple(perm21.shape)}")


def ctr_all_loss(
    q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, perm12: Tensor, perm21: Tensor, tau: float,
    reduction: str = "mean",
) -> Tensor:
    """Eq. 2 with ``N^ALL``: negatives are all tokens of all images (on all ranks) except the
    query's own token ``(a, b, i)``; the positive ``(ā, b, σ(i))`` is in the denominator once.

    ``q_a``, ``k_a``: ``(B, S, D)``; ``perm12[b, i]``: the view-2 token matched to view-1 token i
    (``perm21`` the other way). Returns the mean, or ``(2, B, S)`` per-token losses with
    ``reduction='none'``. Keys of other ranks are gathered without gradient; local keys keep theirs.
    """
    _check(q1, q2, k1, k2, perm12, perm21)
    b, s, _ = q1.shape
    with torch.autocast(q1.device.type, enabled=False):  # float32 logits (autocast would round q @ k.t())
        q = F.normalize(torch.stack([q1, q2]).float(), dim=-1).flatten(0, 2)  # (2BS, D)
        k = F.normalize(torch.stack([k1, k2]).float(), dim=-1).flatten(0, 2)
        n = q.shape[0]
        offset = 0
        if get_world_size() > 1:
            rank = get_rank()
            gathered = concat_all_gather(k.detach())
            k = torch.cat([gathered[: rank * n], k, gathered[(rank + 1) * n :]])
            offset = rank * n
        logits = q @ k.t() / tau
        own = torch.arange(n, device=q.device) + offset
        logits = logits.scatter(1, own.unsqueeze(1), float("-inf"))  # (a, b, i) is not its own negative
        target = _positives(perm12, perm21, b, s).flatten() + offset
        loss = F.cross_entropy(logits, target, reduction="none").view(2, b, s)
    return loss.mean() if reduction == "mean" else loss


def ctr_img_loss(
    q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, perm12: Tensor, perm21: Tensor, tau: float,
    reduction: str = "mean",
) -> Tensor:
    """Eq. 2 with ``N^IMG``: negatives are only the other tokens of the two views of the same image.

    One ``(2S, 2S)`` logit block per image (a batched matmul): no token of another image, on this
    rank or another, ever enters the denominator. Shapes as :func:`ctr_all_loss`.
    """
    _check(q1, q2, k1, k2, perm12, perm21)
    b, s, _ = q1.shape
    with torch.autocast(q1.device.type, enabled=False):  # float32 logits (autocast would round the bmm)
        q = F.normalize(torch.stack([q1, q2], dim=1).float(), dim=-1).flatten(1, 2)  # (B, 2S, D)
        k = F.normalize(torch.stack([k1, k2], dim=1).float(), dim=-1).flatten(1, 2)
        logits = torch.bmm(q, k.transpose(1, 2)) / tau  # (B, 2S, 2S)
        eye = torch.eye(2 * s, dtype=torch.bool, device=q.device)
        logits = logits.masked_fill(eye, float("-inf"))
        target = torch.cat([perm12 + s, perm21], dim=1)  # row (a, i) -> column (ā, σ_a(i))
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(b, 2, s)
    loss = loss.transpose(0, 1)
    return loss.mean() if reduction == "mean" else loss


def cossim_loss(
    q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, perm12: Tensor, perm21: Tensor, tau: float | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Eq. 3: ``-cos(q_abi, stopgrad(k_āb σ(i)))``, negative-free; the target never gets gradient.

    ``tau`` is unused (the signature matches the contrastive variants).
    """
    _check(q1, q2, k1, k2, perm12, perm21)
    t2 = torch.gather(k2.detach(), 1, perm12.unsqueeze(-1).expand(-1, -1, k2.shape[-1]))
    t1 = torch.gather(k1.detach(), 1, perm21.unsqueeze(-1).expand(-1, -1, k1.shape[-1]))
    with torch.autocast(q1.device.type, enabled=False):  # float32 on every backend's autocast list
        loss = -torch.stack([
            F.cosine_similarity(q1.float(), t2.float(), dim=-1),
            F.cosine_similarity(q2.float(), t1.float(), dim=-1),
        ])
    return loss.mean() if reduction == "mean" else loss


def object_loss(
    kind: str, q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, perm12: Tensor, perm21: Tensor, tau: float
) -> Tensor:
    """The object loss selected by ``kind`` (``model.object_loss``): ctr_all | ctr_img | cossim."""
    fns = {"ctr_all": ctr_all_loss, "ctr_img": ctr_img_loss, "cossim": cossim_loss}
    if kind not in fns:
        raise ValueError(f"model.object_loss: unknown object loss {kind!r}; expected one of {OBJECT_LOSSES}")
    return fns[kind](q1, q2, k1, k2, perm12, perm21, tau)


__all__ = [
    "OBJECT_LOSSES", "hungarian_match", "match_slots", "ctr_all_loss", "ctr_img_loss", "cossim_loss", "object_loss",
]
