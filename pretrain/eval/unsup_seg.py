"""Unsupervised semantic segmentation (SlotCon Sec. 4.4, Table 5).

Each pixel takes the prototype of highest teacher assignment (``method.assign``, upsampled
bilinearly to the label resolution, 320 px in the paper); predicted groups are matched once, over
the whole dataset, to the ground-truth classes with the Hungarian algorithm; mIoU and pixel accuracy
follow. Many-to-one scores are reported beside them. With K != C see :func:`pretrain.eval.metrics.matched_scores` for how unmatched groups count.

The same function scores a randomly initialised network (``load_method(..., random_init=True)``):
its ``assign`` uses random prototypes, the untrained analogue the demo compares against.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from .inference import assign_batch, default_device, iterate_batches, make_loader
from .metrics import IGNORE_INDEX, HungarianSegMeter
from .visualize import hard_labels


@torch.no_grad()
def evaluate_unsup_seg(method: nn.Module, dataset: Dataset, *, batch_size: int = 16, num_workers: int = 0,
                       device: torch.device | None = None, amp: bool = True, progress: bool = True,
                       ignore_index: int = IGNORE_INDEX) -> dict:
    """Hungarian-matched mIoU and pixel accuracy of the method's prototype assignment.

    Args:
        method: any method of the Method API (``assign(images) -> (B,K,h,w)``), put in eval mode.
        dataset: yields ``{"image", "label", "index"}`` with semantic labels (``num_classes``,
            ``class_names`` attributes), e.g. :class:`CocoStuff27` or :class:`ToySemantic`.

    Returns:
        ``{"miou", "pacc"}`` in percent (one-to-one Hungarian: the paper's protocol),
        ``{"miou_majority", "pacc_majority"}`` (many-to-one, informative when K > C), ``iou_per_class`` (percent, by class name, ``None`` for
        classes absent from the set), ``num_prototypes``, ``num_classes``, ``num_images``,
        ``num_pixels``, ``mapping`` (prototype -> class index or -1), ``used_prototypes`` (how
        many prototypes won at least one pixel).
    """
    device = device or default_device()
    method.eval()
    num_classes = int(dataset.num_classes)  # type: ignore[attr-defined]
    names = list(getattr(dataset, "class_names", [str(i) for i in range(num_classes)]))
    meter: HungarianSegMeter | None = None
    used: torch.Tensor | None = None
    n = 0
    for batch in iterate_batches(make_loader(dataset, batch_size, num_workers, device), "unsup_seg", progress):
        a = assign_batch(method, batch["image"], device, amp)
        labels = batch["label"].to(device, non_blocking=True)
        pred = hard_labels(a, tuple(labels.shape[-2:]))
        if meter is None:
            meter = HungarianSegMeter(a.shape[1], num_classes, ignore_index)
            used = torch.zeros(a.shape[1], dtype=torch.bool, device=device)
        used[pred.unique()] = True
        meter.update(pred, labels)
        n += pred.shape[0]
    if meter is None:
        raise ValueError("evaluate_unsup_seg: empty dataset")
    r = meter.compute()
    return {
        "miou": 100.0 * r["miou"],
        "pacc": 100.0 * r["pacc"],
        "miou_majority": 100.0 * r["miou_majority"],
        "pacc_majority": 100.0 * r["pacc_majority"],
        "iou_per_class": {nm: (None if v is None else 100.0 * v) for nm, v in zip(names, r["iou_per_class"])},
        "num_prototypes": int(meter.num_pred),
        "num_classes": num_classes,
        "num_images": n,
        "num_pixels": r["num_pixels"],
        "used_prototypes": int(used.sum()),
        "mapping": r["mapping"],
    }
