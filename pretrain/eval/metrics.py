"""Segmentation metrics: Hungarian-matched mIoU / pixel accuracy, ARI-FG, Otsu masks, matched IoU.

* Unsupervised semantic segmentation (SlotCon Sec. 4.4, Table 5): a confusion matrix between
  predicted groups and ground-truth classes is accumulated over the *whole* dataset, groups are
  matched one-to-one to classes by the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``),
  then mIoU and pixel accuracy are read off the matched matrix.
* Object discovery: ARI on foreground pixels (Slot Attention Sec. 5.9), the mean IoU of
  Otsu-binarised masks matched to ground-truth objects (Baldassarre & Azizpour, App. A.5, Table 2),
  and the mean best overlap (mBO) of each object with any predicted group.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

IGNORE_INDEX = 255


# --------------------------------------------------------------------------------------------
# Hungarian-matched semantic segmentation
# --------------------------------------------------------------------------------------------

def confusion_matrix(pred: Tensor | np.ndarray, gt: Tensor | np.ndarray, num_pred: int,
                     num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Counts ``M[g, c]`` of pixels with predicted group ``g`` and ground-truth class ``c``.

    Pixels whose ground truth is ``ignore_index`` are dropped. A predicted label outside
    ``[0, num_pred)`` or a ground-truth label outside ``[0, num_classes)`` (other than the ignore
    index) is an error: silently dropping them would inflate the scores.
    """
    p = torch.as_tensor(pred).reshape(-1).long()
    t = torch.as_tensor(gt).reshape(-1).long().to(p.device)
    if p.numel() != t.numel():
        raise ValueError(f"prediction has {p.numel()} pixels but ground truth has {t.numel()}")
    keep = t != ignore_index
    p, t = p[keep], t[keep]
    if p.numel() and (p.min() < 0 or p.max() >= num_pred):
        raise ValueError(f"predicted labels must lie in [0,{num_pred}); got [{p.min()},{p.max()}]")
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"ground-truth labels must lie in [0,{num_classes}) or be {ignore_index}; "
                         f"got [{t.min()},{t.max()}]")
    m = torch.bincount(p * num_classes + t, minlength=num_pred * num_classes)
    return m.reshape(num_pred, num_classes).cpu().numpy().astype(np.int64)


def hungarian_match(confusion: np.ndarray) -> np.ndarray:
    """One-to-one matching of predicted groups (rows) to classes (columns) maximising matched pixels.

    Returns ``mapping`` of length ``num_pred`` with the matched class of each group, or ``-1`` for
    a group left unmatched (possible when there are more groups than classes).
    """
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    mapping = np.full(confusion.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def majority_mapping(confusion: np.ndarray) -> np.ndarray:
    """Many-to-one mapping: each group to its most frequent class (IIC's over-clustering
    evaluation); groups without pixels map to ``-1``."""
    confusion = np.asarray(confusion)
    mapping = confusion.argmax(axis=1).astype(np.int64)
    mapping[confusion.sum(axis=1) == 0] = -1
    return mapping


def _scores_for_mapping(confusion: np.ndarray, mapping: np.ndarray) -> tuple[float, float, np.ndarray]:
    num_classes = confusion.shape[1]
    total = int(confusion.sum())
    gt_count = confusion.sum(axis=0)
    tp = np.zeros(num_classes, dtype=np.int64)
    pred_count = np.zeros(num_classes, dtype=np.int64)
    for g, c in enumerate(mapping):
        if c >= 0:
            tp[c] += confusion[g, c]
            pred_count[c] += confusion[g].sum()
    union = gt_count + pred_count - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    valid = union > 0
    miou = float(np.mean(iou[valid])) if valid.any() else float("nan")
    pacc = float(tp.sum() / total) if total else float("nan")
    return miou, pacc, iou


def matched_scores(confusion: np.ndarray, mapping: np.ndarray | None = None) -> dict:
    """mIoU and pixel accuracy after matching groups to classes (SlotCon Sec. 4.4).

    With ``K`` groups and ``C`` classes:

    * ``K == C`` (the paper's K=27 protocol): a permutation.
    * ``K > C``: the Hungarian algorithm picks the ``C`` groups that best explain the classes; the
      pixels of the other ``K - C`` groups count as *wrong* (a false negative of their true class,
      a false positive of no class). This is the strict reading of "each ground-truth label is
      assigned to a prototype mutual-exclusively" and never rewards over-segmentation.
    * ``K < C``: ``C - K`` classes get no group: their IoU is 0 and their pixels are wrong.

    IoU of class ``c`` = TP / (TP + FP + FN) of its matched group; the mean runs over classes present
    in the ground truth or predicted (union > 0), so classes absent from a small evaluation set do
    not count as 0 or 1. Pixel accuracy = matched pixels / all non-ignored pixels.

    Because the strict one-to-one score cannot tell a model that splits a class over several
    prototypes (expected when K > C, e.g. K=256 or the toy demo's K=16 for 6 classes) from one
    that mixes classes, the many-to-one scores (:func:`majority_mapping`) are returned as well,
    as ``miou_majority`` / ``pacc_majority``; they equal the Hungarian ones when K == C and the
    groups are pure. The paper's Table 5 numbers are the one-to-one ones.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    if mapping is None:
        mapping = hungarian_match(confusion)
    miou, pacc, iou = _scores_for_mapping(confusion, mapping)
    major = majority_mapping(confusion)
    miou_m, pacc_m, _ = _scores_for_mapping(confusion, major)
    return {
        "miou": miou,
        "pacc": pacc,
        "iou_per_class": [None if np.isnan(v) else float(v) for v in iou],
        "mapping": mapping.tolist(),
        "miou_majority": miou_m,
        "pacc_majority": pacc_m,
        "majority_mapping": major.tolist(),
        "num_pixels": int(confusion.sum()),
    }


@dataclass
class HungarianSegMeter:
    """Accumulates the group-by-class confusion matrix over a dataset, then scores it once.

    Matching per image would let every image choose its own permutation and overstate the result;
    the protocol (PiCIE/IIC, SlotCon Sec. 4.4) matches once over the whole evaluation set.
    """

    num_pred: int
    num_classes: int
    ignore_index: int = IGNORE_INDEX
    confusion: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.confusion = np.zeros((self.num_pred, self.num_classes), dtype=np.int64)

    def update(self, pred: Tensor, gt: Tensor) -> None:
        """Add a batch of predicted label maps and ground-truth maps of the same shape."""
        self.confusion += confusion_matrix(pred, gt, self.num_pred, self.num_classes, self.ignore_index)

    def compute(self) -> dict:
        """Hungarian-match and return ``miou``, ``pacc`` (fractions in [0,1]) and details."""
        return matched_scores(self.confusion)


# --------------------------------------------------------------------------------------------
# Adjusted Rand Index on foreground pixels
# --------------------------------------------------------------------------------------------

def _comb2(x: np.ndarray) -> int:
    x = x.astype(np.int64)
    return int((x * (x - 1) // 2).sum())


def adjusted_rand_index(true_labels: np.ndarray | Tensor, pred_labels: np.ndarray | Tensor) -> float:
    """ARI of two flat labelings (Hubert & Arabie), from their contingency table.

    Agrees with ``sklearn.metrics.adjusted_rand_score`` including its special case: when the two
    labelings agree on every pair (e.g. both put all points in one cluster) the score is 1.
    """
    a = np.asarray(torch.as_tensor(true_labels).reshape(-1).cpu(), dtype=np.int64)
    b = np.asarray(torch.as_tensor(pred_labels).reshape(-1).cpu(), dtype=np.int64)
    if a.shape != b.shape:
        raise ValueError(f"labelings differ in length: {a.shape} vs {b.shape}")
    n = a.size
    if n == 0:
        return float("nan")
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    nb = int(bi.max()) + 1
    cont = np.bincount(ai * nb + bi, minlength=(int(ai.max()) + 1) * nb)
    sum_ij = _comb2(cont)
    sum_a = _comb2(np.bincount(ai))
    sum_b = _comb2(np.bincount(bi))
    if sum_ij == sum_a == sum_b:  # pair-level full agreement (sklearn: fn == fp == 0)
        return 1.0
    total = n * (n - 1) // 2
    expected = sum_a * sum_b / total
    max_index = 0.5 * (sum_a + sum_b)
    return float((sum_ij - expected) / (max_index - expected))


def ari_fg(instances: Tensor, pred_labels: Tensor, background: int = 0) -> list[float]:
    """Foreground ARI per image (Slot Attention Sec. 5.9: background pixels are excluded).

    Args:
        instances: ``(B,H,W)`` ground-truth instance ids, ``background`` for background.
        pred_labels: ``(B,H,W)`` predicted group per pixel (argmax of the soft assignment).

    Returns:
        One score per image; ``nan`` for an image without foreground pixels (callers skip those).
    """
    if instances.shape != pred_labels.shape:
        raise ValueError(f"shapes differ: {tuple(instances.shape)} vs {tuple(pred_labels.shape)}")
    out = []
    for t, p in zip(instances.cpu(), pred_labels.cpu()):
        fg = t != background
        out.append(adjusted_rand_index(t[fg], p[fg]) if fg.any() else float("nan"))
    return out


# --------------------------------------------------------------------------------------------
# Otsu-binarised masks and Hungarian-matched IoU (Baldassarre & Azizpour App. A.5)
# --------------------------------------------------------------------------------------------

def otsu_binarize(maps: Tensor) -> Tensor:
    """Binarise each map ``(..., H, W)`` separately with its own Otsu threshold.

    Each map is rescaled to ``[0, 255]`` by its own min/max and thresholded with OpenCV's Otsu
    (a 256-bin histogram, as scikit-image's default); pixels strictly above the threshold are on.
    A constant map carries no contrast and yields an empty mask. Masks may overlap (App. A.5).
    """
    shape = maps.shape
    flat = maps.detach().float().cpu().reshape(-1, shape[-2], shape[-1]).numpy()
    out = np.zeros(flat.shape, dtype=bool)
    for i, m in enumerate(flat):
        lo, hi = float(m.min()), float(m.max())
        if not np.isfinite(lo) or not np.isfinite(hi):
            raise ValueError("attention map contains non-finite values")
        if hi - lo <= 1e-12:
            continue
        u8 = np.round((m - lo) / (hi - lo) * 255.0).astype(np.uint8)
        _, binary = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        out[i] = binary > 0
    return torch.from_numpy(out).reshape(shape)


def mask_iou(pred_masks: Tensor, gt_masks: Tensor) -> Tensor:
    """Pairwise IoU ``(P, G)`` between boolean masks ``(P,H,W)`` and ``(G,H,W)``."""
    p = pred_masks.reshape(pred_masks.shape[0], -1).float()
    g = gt_masks.reshape(gt_masks.shape[0], -1).float()
    inter = p @ g.T
    union = p.sum(1, keepdim=True) + g.sum(1).unsqueeze(0) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))


def matched_iou(pred_masks: Tensor, instances: Tensor, background: int = 0) -> float:
    """Mean IoU of ground-truth objects with their Hungarian-matched predicted masks (App. A.5).

    Every ground-truth object except the background is assigned to one predicted mask so that the
    total IoU is maximal; unmatched predictions are discarded, and an object left without a mask
    (fewer masks than objects) scores 0. The mean runs over the image's objects ("IoU is computed
    from the perspective of the ground truth"). Returns ``nan`` for an image without objects.

    Args:
        pred_masks: ``(P,H,W)`` boolean masks (e.g. from :func:`otsu_binarize`).
        instances: ``(H,W)`` instance ids, ``background`` for background.
    """
    ids = [int(i) for i in torch.unique(instances) if int(i) != background]
    if not ids:
        return float("nan")
    gt = torch.stack([instances == i for i in ids])
    if pred_masks.shape[0] == 0:
        return 0.0
    iou = mask_iou(pred_masks.bool(), gt).cpu().numpy()
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return float(iou[rows, cols].sum() / len(ids))


# --------------------------------------------------------------------------------------------
# Mean best overlap
# --------------------------------------------------------------------------------------------

def best_overlap(instances: Tensor, pred_labels: Tensor, background: int = 0) -> float:
    """Best overlap of one image: each ground-truth object's highest IoU with any predicted group, averaged
    over the image's objects (background excluded); ``nan`` for an image without objects.

    Unlike :func:`matched_iou` several objects may pick the same group, so mBO measures how well each
    object is covered by *some* group without penalising a group that spans several objects twice.

    Args:
        instances: ``(H,W)`` instance ids, ``background`` for background.
        pred_labels: ``(H,W)`` predicted group per pixel (hard masks: the argmax of the assignment).
    """
    if instances.shape != pred_labels.shape:
        raise ValueError(f"shapes differ: {tuple(instances.shape)} vs {tuple(pred_labels.shape)}")
    ids = [int(i) for i in torch.unique(instances) if int(i) != background]
    if not ids:
        return float("nan")
    gt = torch.stack([instances == i for i in ids])
    groups = torch.unique(pred_labels)
    pred = torch.stack([pred_labels == g for g in groups])
    return float(mask_iou(pred.cpu(), gt.cpu()).max(dim=0).values.mean())

