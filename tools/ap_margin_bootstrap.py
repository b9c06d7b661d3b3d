"""How sure is a box-AP margin? A paired bootstrap over the validation images of two Detectron2 runs.

    python tools/ap_margin_bootstrap.py data/toy_scenes/annotations/instances_val2017.json \
        runs/demo/transfer/det_full_pretrained runs/demo/transfer/det_full_random [--samples 40] [--iou-type bbox]

Each run folder holds Detectron2's ``inference/coco_instances_results.json`` (what ``python -m transfer.detection``
writes). Both runs are scored on the same resampled image lists (drawn with replacement, seed 0), so the spread
of ``AP(a) - AP(b)`` is the part of the margin's uncertainty that comes from which images were in the
validation set; it says nothing about the fine-tune's own seed. Scoring is the official pycocotools COCOeval.
Prints the full-set APs, the margin, and the bootstrap's standard error and 2.5-97.5 % interval.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())  # pycocotools prints every stage


def load_results(run_dir: str | Path) -> dict[int, list[dict]]:
    """A run's detections grouped by image id."""
    path = Path(run_dir) / "inference" / "coco_instances_results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a finished `python -m transfer.detection` run folder")
    by_image: dict[int, list[dict]] = {}
    for det in json.loads(path.read_text()):
        by_image.setdefault(int(det["image_id"]), []).append(det)
    return by_image


def average_precision(gt: COCO, dets: dict[int, list[dict]], image_ids: list[int], iou_type: str = "bbox") -> float:
    """COCO AP (percent) over ``image_ids``, which may repeat: each draw is scored as an image of its own."""
    # Mask AP without the box: with it pycocotools takes the box area as the instance's (Detectron2 drops it too).
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    images, anns, results = [], [], []
    for k, image_id in enumerate(image_ids, start=1):
        images.append({**gt.imgs[image_id], "id": k})
        anns += [{**a, "image_id": k, "id": len(anns) + i + 1} for i, a in enumerate(gt.imgToAnns[image_id])]
        results += [{**{f: v for f, v in d.items() if f != drop}, "image_id": k} for d in dets.get(image_id, [])]
    resampled = COCO()
    resampled.dataset = {"images": images, "annotations": anns, "categories": list(gt.cats.values())}
    with _quiet():
        resampled.createIndex()
        if not results:
            return 0.0
        ev = COCOeval(resampled, resampled.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(max(ev.stats[0], 0.0) * 100)  # -1 (no ground truth) reads as 0


def bootstrap_margin(gt_json: str | Path, run_a: str | Path, run_b: str | Path, samples: int = 40,
                     iou_type: str = "bbox", seed: int = 0) -> dict[str, float]:
    """``{"ap_a", "ap_b", "margin", "stderr", "lo", "hi"}``: AP(a) - AP(b) and its paired-bootstrap spread."""
    with _quiet():
        gt = COCO(str(gt_json))
    dets_a, dets_b = load_results(run_a), load_results(run_b)
    ids = sorted(gt.imgs)
    ap_a, ap_b = average_precision(gt, dets_a, ids, iou_type), average_precision(gt, dets_b, ids, iou_type)
    rng = np.random.default_rng(seed)
    margins = []
    for _ in range(samples):
        draw = [int(i) for i in rng.choice(ids, size=len(ids), replace=True)]
        margins.append(average_precision(gt, dets_a, draw, iou_type) - average_precision(gt, dets_b, draw, iou_type))
    m = np.asarray(margins)
    return {"ap_a": ap_a, "ap_b": ap_b, "margin": ap_a - ap_b, "stderr": float(m.std(ddof=1)) if samples > 1 else 0.0,
            "lo": float(np.percentile(m, 2.5)), "hi": float(np.percentile(m, 97.5))}


def main(argv: list[str] | None = None) -> int:
    """Print the margin of run A over run B with its bootstrap standard error."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gt_json", help="the validation split's COCO annotations")
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--samples", type=int, default=40, help="bootstrap resamples (default 40)")
    p.add_argument("--iou-type", choices=("bbox", "segm"), default="bbox")
    a = p.parse_args(argv)
    if a.samples < 2:
        p.error(f"--samples must be at least 2, got {a.samples}")
    try:
        r = bootstrap_margin(a.gt_json, a.run_a, a.run_b, a.samples, a.iou_type)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"AP {a.iou_type}: {r['ap_a']:.2f} ({a.run_a}) vs {r['ap_b']:.2f} ({a.run_b}): margin {r['margin']:+.2f}, "
          f"bootstrap standard error {r['stderr']:.2f}, 95% interval [{r['lo']:+.2f}, {r['hi']:+.2f}] "
          f"({a.samples} resamples of the {a.gt_json} images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
