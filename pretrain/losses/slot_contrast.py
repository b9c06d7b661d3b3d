"""Group-level contrastive learning between slots (SlotCon Sec. 3.2, Eq. 5-7)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .gather import all_reduce_sum, concat_all_gather, get_rank, get_world_size


@torch.no_grad()
def active_mask(logits: Tensor) -> Tensor:
    """Eq. 5: slot k is active in a view iff it is the argmax of some pixel. ``(B, K, h, w) -> (B, K)`` bool.

    The argmax of ``softmax(logits / τ)`` over K equals the argmax of the logits, so the raw
    similarities suffice.
    """
    b, k = logits.shape[:2]
    winners = logits.flatten(2).argmax(dim=1)  # (B, h*w)
    mask = torch.zeros(b, k, dtype=torch.bool, device=logits.device)
    return mask.scatter_(1, winners, True)


def slot_infonce(
    pred: Tensor,
    query_index: Tensor,
    teacher_all: Tensor,
    teacher_mask_all: Tensor,
    tau: float,
    num_keys: int | None = None,
) -> Tensor:
    """InfoNCE of Eq. 6 for the selected student slots, summed (not averaged) over them.

    ``pred``: ``(n, D)`` predictor outputs q(s_θ) of the selected student slots; ``query_index``:
    ``(n,)`` the flat index of each one's positive in ``teacher_all`` (slot k of the same image in
    the other view, offset by this rank's position in the gather); ``teacher_all``: ``(M, D)``
    teacher slots of every image on every rank; ``teacher_mask_all``: ``(M,)`` their activity
    (Eq. 5); ``num_keys``: ``teacher_mask_all.sum()`` when the caller has it on the host already
    (saves a device read). Negatives are all active teacher slots. Returns the float32 sum of the n losses.
    """
    keys_idx = _true_indices(teacher_mask_all, num_keys)
    # The position of each positive among the active keys.
    labels = teacher_mask_all.long().cumsum(0)[query_index] - 1
    with torch.autocast(pred.device.type, enabled=False):  # float32 logits and log-sum-exp
        keys = F.normalize(teacher_all.detach().float()[keys_idx], dim=1)
        logits = F.normalize(pred.float(), dim=1) @ keys.t() / tau
        return F.cross_entropy(logits, labels, reduction="sum")


def _true_indices(mask: Tensor, count: int | None) -> Tensor:
    """The indices of ``mask``'s True entries in order, like ``mask.nonzero()``; with ``count`` known
    on the host, without the device read ``nonzero`` makes for its output size (a stable sort puts
    the True entries first)."""
    if count is None:
        return mask.nonzero().squeeze(1)
    return torch.argsort((~mask).to(torch.uint8), stable=True)[:count]


def _needs_two_samples(predictor: Callable[[Tensor], Tensor]) -> bool:
    """Whether ``predictor`` holds training-mode BatchNorm that normalises this rank's batch alone.

    Such a BN raises on a single sample; SyncBN across ranks does not (its statistics pool every
    rank's samples), and it is a collective, so it must never be skipped on one rank only.
    """
    if not isinstance(predictor, torch.nn.Module):
        return False
    synced = get_world_size() > 1
    return any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
        and not (synced and isinstance(m, torch.nn.SyncBatchNorm))
        for m in predictor.modules()
    )


def _zero_touching(student_slots: Tensor, predictor: Callable[[Tensor], Tensor]) -> Tensor:
    """A zero loss whose graph reaches the student slots and every predictor parameter, so that DDP
    finds each of them used (and all-reduces their zero gradients) on this rank too."""
    zero = student_slots.sum() * 0.0
    if isinstance(predictor, torch.nn.Module):
        zero = zero + sum(p.sum() for p in predictor.parameters()) * 0.0
    return zero


def slot_contrastive_loss(
    student_slots: Tensor,
    teacher_slots: Tensor,
    student_mask: Tensor,
    teacher_mask: Tensor,
    predictor: Callable[[Tensor], Tensor],
    tau: float,
    *,
    gathered: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Eq. 6 for one direction ``L^InfoNCE(S_θ^l, S_ξ^{l'})``, scaled by ``2·τc`` (recipe).

    ``student_slots``: ``(B, K, D)`` student slots of view l (with gradient); ``teacher_slots``:
    ``(B, K, D)`` teacher slots of view l'; masks ``(B, K)`` bool from Eq. 5. A student slot enters
    only where it is active in view l *and* the same prototype is active in the teacher's view l';
    its positive is teacher slot k of the same image in view l'; negatives are every active teacher
    slot of every image on every rank. ``gathered`` may pass ``(teacher_all, teacher_mask_all)``
    already gathered over ranks (rank-major, ``B*K`` rows per rank) to save a collective.

    Normalisation: the recipe averages over the selected slots. Here the sum is divided by the
    all-reduced count / world size, which equals that mean in one process, and makes the average
    over ranks (what DDP applies to gradients) the exact mean over all selected slots of the global
    batch, whatever each rank's count.
    """
    b, k, _ = student_slots.shape
    if teacher_slots.shape[:2] != (b, k) or student_mask.shape != (b, k) or teacher_mask.shape != (b, k):
        raise ValueError("slot_contrastive_loss: slots and masks must share (B, K)")
    selected = (student_mask & teacher_mask).flatten()
    if gathered is None:
        gathered = (concat_all_gather(teacher_slots.detach().flatten(0, 1)), concat_all_gather(teacher_mask.flatten()))
    teacher_all, teacher_mask_all = gathered
    local = selected.sum()
    count = all_reduce_sum(local.float())
    # The loss's one device read: this rank's and all ranks' selected counts, and the active keys.
    # The sizes of the index tensors below follow from it, so none of them reads the device again.
    n_local, n_total, n_keys = (int(v) for v in torch.stack([local.float(), count,
                                                              teacher_mask_all.sum().float()]).tolist())
    # Every rank runs the predictor every step, also with an empty selection: its BNs are SyncBN on
    # CUDA with several ranks, a collective in forward and backward, so a rank that skipped it would
    # leave the others waiting. Empty batches are valid there (SyncBN gathers a zero count from that
    # rank; plain BN returns an empty output and keeps its running statistics), and the empty
    # prediction's zero loss keeps the predictor in the graph, so the backward collective runs too.
    # Only decisions every rank takes alike may skip it: no query on any rank (the all-reduced
    # count; SyncBN would normalise with no samples at all), or a single query for a BN that sees
    # this rank's batch alone (no collective there; it cannot normalise one sample).
    if n_total == 0 or (n_local == 1 and _needs_two_samples(predictor)):
        return _zero_touching(student_slots, predictor)
    query = _true_indices(selected, n_local)
    pred = predictor(student_slots.flatten(0, 1)[query])
    total = slot_infonce(pred, query + get_rank() * b * k, teacher_all, teacher_mask_all, tau, num_keys=n_keys)
    return total * (get_world_size() / count.clamp(min=1.0)) * (2.0 * tau)


__all__ = ["active_mask", "slot_infonce", "slot_contrastive_loss"]
