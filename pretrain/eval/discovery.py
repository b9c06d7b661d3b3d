"""Object discovery metrics on datasets with instance masks (toy scenes ``instances/``).

* ARI-FG (Slot Attention Sec. 5.9): Adjusted Rand Index between the per-pixel argmax group and the
  ground-truth instances, on foreground pixels only; mean over images.
* Otsu mIoU (Baldassarre & Azizpour App. A.5, Table 2): each group's soft map, upsampled to the
  label resolution, is binarised with its own Otsu threshold; ground-truth objects (background
  excluded) are Hungarian-matched to those masks by IoU; IoU is averaged over an image's objects,
  then over images.
* mBO (mean best overlap): each ground-truth object's highest IoU with any hard (argmax) group,
  averaged over an image's objects, then over images.

For SlotCon the maps are the teacher's soft prototype assignments. With K=256 prototypes most are
unused in a given image; their near-zero maps, once contrast-stretched by Otsu, are noise that
Hungarian matching could pick up by chance. By default only the image's *active* groups (argmax of
at least one pixel, the analogue of SlotCon's Eq. 5 active mask) are candidates; slot-based
methods with few slots are unaffected. ``active_only=False`` uses every map.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .inference import assign_batch, default_device, iterate_batches, make_loader
from .metrics import ari_fg, best_overlap, matched_iou, otsu_binarize


def _nanmean(xs: list[float]) -> float:
    vals = [x for x in xs if not math.isnan(x)]
    return float(sum(vals) / len(vals)) if vals else float("nan")


@torch.no_grad()
def evaluate_discovery(method: nn.Module, dataset: Dataset, *, batch_size: int = 16, num_workers: int = 0,
                       device: torch.device | None = None, amp: bool = True, progress: bool = True,
                       active_only: bool = True, background: int = 0) -> dict:
    """ARI-FG, Otsu-matched mIoU and mBO (percent) of the method's groups against instance masks.

    ``dataset`` yields ``{"image", "label", "index"}`` with ``label`` = instance ids, ``background``
    for background (e.g. :class:`pretrain.eval.datasets.ToyInstances`). Images without objects are
    skipped and counted in ``num_images_without_objects``.
    """
    device = device or default_device()
    method.eval()
    aris: list[float] = []
    ious: list[float] = []
    overlaps: list[float] = []
    for batch in iterate_batches(make_loader(dataset, batch_size, num_workers, device), "discovery", progress):
        a = assign_batch(method, batch["image"], device, amp)
        inst = batch["label"]
        for ai, t in zip(a, inst):  # one image at a time: K full-resolution maps per image at most
            m = F.interpolate(ai[None], size=tuple(t.shape[-2:]), mode="bilinear", align_corners=False)[0]
            p = m.argmax(dim=0)
            aris.extend(ari_fg(t[None], p[None].cpu(), background))
            overlaps.append(best_overlap(t, p.cpu(), background))
            cand = m[torch.unique(p)] if active_only else m
            ious.append(matched_iou(otsu_binarize(cand), t, background))
    skipped = sum(math.isnan(x) for x in aris)
    return {
        "ari_fg": 100.0 * _nanmean(aris),
        "miou_otsu": 100.0 * _nanmean(ious),
        "mbo": 100.0 * _nanmean(overlaps),
        "num_images": len(aris),
        "num_images_without_objects": int(skipped),
        "active_only": active_only,
    }
