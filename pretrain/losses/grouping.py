"""Semantic-grouping self-distillation (SlotCon Sec. 3.1, Eq. 1-3) and inverse augmentation.

All functions are pure functions of tensors; the method module owns the centre buffer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from .gather import all_reduce_sum


def inverse_augment(maps: Tensor, boxes: Tensor, flips: Tensor) -> Tensor:
    """Inverse augmentation of Sec. 3.1: RoIAlign to the views' intersection, then un-flip.

    ``maps``: ``(N, C, h, w)``; ``boxes``: ``(N, 4)`` intersection ``(x1, y1, x2, y2)`` in ``[0, 1]``
    in each view's own (post-flip) coordinates; ``flips``: ``(N,)`` flip codes (bit 0 horizontal,
    bit 1 vertical; a bool is a horizontal flip). Follows docs/contracts.md:
    ``roi_align(map, box * (w, h), output=(h, w), aligned=True)``, then the view's flips undone, so
    aligned pixel ``(i, j)`` of both views is the same image location. Vectorised over the batch.
    Returns a float32 ``(N, C, h, w)`` map.
    """
    if maps.dim() != 4:
        raise ValueError(f"inverse_augment: maps must be (N, C, h, w), got {tuple(maps.shape)}")
    n, _, h, w = maps.shape
    if boxes.shape != (n, 4) or flips.shape != (n,):
        raise ValueError(
            f"inverse_augment: boxes {tuple(boxes.shape)} / flips {tuple(flips.shape)} do not match {n} maps"
        )
    maps = maps.float()
    scale = boxes.new_tensor([w, h, w, h], dtype=torch.float32)
    idx = torch.arange(n, device=maps.device, dtype=torch.float32).unsqueeze(1)
    rois = torch.cat([idx, boxes.to(device=maps.device, dtype=torch.float32) * scale], dim=1)
    aligned = roi_align(maps, rois, output_size=(h, w), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    code = flips.to(device=maps.device, dtype=torch.int64).view(n, 1, 1, 1)
    aligned = torch.where((code & 1) > 0, aligned.flip(-1), aligned)
    return torch.where((code & 2) > 0, aligned.flip(-2), aligned)


def self_distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, center: Tensor, tau_s: float, tau_t: float
) -> Tensor:
    """Pixel-wise cross-entropy of Eq. 2 for one direction, averaged over all pixels.

    ``student_logits``, ``teacher_logits``: aligned similarity maps ``(N, K, h, w)`` (Eq. 1 before
    temperature); ``center``: ``(K,)`` mean logit c. ``P = softmax(s / τs)``,
    ``Q = softmax((t - c) / τt)`` (Eq. 1); returns ``mean_{n,i,j} -Σ_k Q log P`` (float32).
    """
    c = center.float().view(1, -1, 1, 1)
    q = torch.softmax((teacher_logits.detach().float() - c) / tau_t, dim=1)
    log_p = F.log_softmax(student_logits.float() / tau_s, dim=1)
    return -(q * log_p).sum(dim=1).mean()


@torch.no_grad()
def updated_center(center: Tensor, teacher_logits: Tensor, momentum: float) -> Tensor:
    """Eq. 3: ``c <- λc c + (1 - λc) mean(z̄_ξ · S̄_ξᵀ)`` over all pixels of all images on all ranks.

    ``teacher_logits``: ``(N, K, h, w)`` *unaligned* teacher similarities of both views. The sum and
    the pixel count are all-reduced together, so ranks with different counts still get the global
    mean. Returns the new centre ``(K,)``; the caller stores it after the step's grouping loss.
    """
    k = teacher_logits.shape[1]
    x = teacher_logits.detach().float()
    stats = torch.cat([x.sum(dim=(0, 2, 3)), x.new_tensor([x.numel() / k])])
    stats = all_reduce_sum(stats)
    batch_center = stats[:k] / stats[k]
    return center.float() * momentum + batch_center * (1.0 - momentum)


@torch.no_grad()
def assignment_entropy(logits: Tensor, tau: float, center: Tensor | None = None) -> Tensor:
    """Mean per-pixel entropy (nats) of ``softmax((logits - c) / tau)`` over K; a diagnostic."""
    x = logits.float()
    if center is not None:
        x = x - center.float().view(1, -1, 1, 1)
    log_q = F.log_softmax(x / tau, dim=1)
    return -(log_q.exp() * log_q).sum(dim=1).mean()


__all__ = ["inverse_augment", "self_distillation_loss", "updated_center", "assignment_entropy"]
