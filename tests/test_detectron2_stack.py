"""Stack check: Detectron2 Mask R-CNN R50-FPN trains a step and pycocotools evaluates.

Runs with the pure-Python Detectron2 of scripts/setup.sh and with an official build alike: nothing
here depends on which ``detectron2._C`` is installed.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from pycocotools import mask as mask_util

import transfer.detection.compat  # noqa: F401  (before Detectron2)
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader
from detectron2.data import detection_utils as d2utils
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage

REPO = Path(__file__).resolve().parents[1]
SMOKE_CFG = REPO / "configs/detection/mask_rcnn_FPN_smoke_cpu.yaml"
# Deliberately non-contiguous category ids: Detectron2 maps them to 0..C-1 and back for evaluation.
CATEGORIES = [{"id": 3, "name": "box"}, {"id": 7, "name": "tri"}]


def write_tiny_coco(root: Path, split: str, n: int, size: int = 64) -> Path:
    """A few images with one rectangle (polygon annotation) and one triangle (RLE annotation) each."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    rng = np.random.default_rng(len(split) * 100 + n)
    images, anns = [], []
    for i in range(n):
        img = np.full((size, size, 3), 40, np.uint8)
        x0, y0 = int(rng.integers(2, 12)), int(rng.integers(2, 12))
        w, h = int(rng.integers(16, 26)), int(rng.integers(16, 26))
        img[y0:y0 + h, x0:x0 + w] = (220, 60, 60)
        tri = np.zeros((size, size), np.uint8)
        for r in range(24):  # right triangle in the lower right corner
            tri[36 + r, 36:36 + r + 1] = 1
        img[tri.astype(bool)] = (60, 200, 80)
        name = f"{i:03d}.jpg"
        Image.fromarray(img).save(root / split / name, quality=95)
        images.append({"id": i + 1, "file_name": name, "height": size, "width": size})
        poly = [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]
        anns.append({"id": 2 * i + 1, "image_id": i + 1, "category_id": 3, "segmentation": [poly],
                     "area": float(w * h), "bbox": [x0, y0, w, h], "iscrowd": 0})
        rle = mask_util.encode(np.asfortranarray(tri))
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append({"id": 2 * i + 2, "image_id": i + 1, "category_id": 7, "segmentation": rle,
                     "area": float(mask_util.area(rle)), "bbox": [float(v) for v in mask_util.toBbox(rle)],
                     "iscrowd": 0})
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return path


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinycoco")
    names = {}
    for split, n in (("train2017", 4), ("val2017", 3)):
        name = f"stackcheck_{split}_{id(root)}"
        register_coco_instances(name, {}, str(write_tiny_coco(root, split, n)), str(root / split))
        names[split] = name
    yield root, names
    for name in names.values():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def r50_cfg(names: dict[str, str]):
    cfg = get_cfg()
    cfg.merge_from_file(str(SMOKE_CFG))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 256
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(CATEGORIES)
    cfg.MODEL.WEIGHTS = ""
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 64
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 64
    cfg.DATASETS.TRAIN = (names["train2017"],)
    cfg.DATASETS.TEST = (names["val2017"],)
    cfg.SOLVER.IMS_PER_BATCH = 2
    return cfg


def coco_ap_from_results(gt_json: Path, results_json: Path, iou_type: str) -> dict[str, float]:
    """AP, AP50, AP75 in percent of a results file, from pycocotools' COCOeval alone: an independent
    reading of what Detectron2's evaluator reports. As Detectron2 does, boxes are dropped for mask AP
    (COCOeval would take a result's box area for its mask's area)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    res = json.loads(Path(results_json).read_text())
    assert res, f"{results_json} holds no detections"
    if iou_type == "segm":
        res = [{k: v for k, v in r.items() if k != "bbox"} for r in res]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
        ev = COCOeval(gt, gt.loadRes(res), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"AP": 100.0 * ev.stats[0], "AP50": 100.0 * ev.stats[1], "AP75": 100.0 * ev.stats[2]}


def test_compat_aliases():
    from PIL import Image as PILImage

    assert PILImage.LINEAR == PILImage.BILINEAR
    assert np.int is int and np.float is float


def test_mask_rcnn_r50_fpn_training_step(tiny_coco):
    torch.manual_seed(0)
    cfg = r50_cfg(tiny_coco[1])
    model = build_model(cfg)
    tv = torchvision.models.resnet50()
    n_tv = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith("fc."))
    assert sum(p.numel() for p in model.backbone.bottom_up.parameters()) == n_tv == 23_508_032
    batch = next(iter(build_detection_train_loader(cfg)))
    assert len(batch) == 2 and all(len(b["instances"]) == 2 for b in batch)
    assert batch[0]["instances"].gt_masks.tensor.dtype == torch.bool  # RLE and polygon -> bitmasks
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    before = model.backbone.bottom_up.res5[0].conv1.weight.detach().clone()
    model.train()
    with EventStorage(0):  # Detectron2's training forward logs into an event storage
        losses = model(batch)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    # untrained heads: mask BCE ~ log 2 and RPN objectness ~ log 2 (sigmoid(0) predictions)
    assert abs(losses["loss_mask"].item() - np.log(2)) < 0.1
    opt.zero_grad()
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    assert not torch.equal(before, model.backbone.bottom_up.res5[0].conv1.weight)


def _evaluate(name: str, out_dir: Path, swap_classes: bool = False, drop_image: int | None = None) -> dict:
    """Evaluate ground-truth-as-predictions with pycocotools (use_fast_impl=False); ``drop_image``: that
    image gets no predictions."""
    evaluator = COCOEvaluator(name, output_dir=str(out_dir), use_fast_impl=False)
    evaluator.reset()
    for d in DatasetCatalog.get(name):
        gt = d2utils.annotations_to_instances(d["annotations"], (d["height"], d["width"]), mask_format="bitmask")
        if d["image_id"] == drop_image:
            gt = gt[[]]
        pred = Instances((d["height"], d["width"]))
        pred.pred_boxes = gt.gt_boxes
        pred.scores = torch.ones(len(gt))
        pred.pred_classes = 1 - gt.gt_classes if swap_classes else gt.gt_classes
        pred.pred_masks = gt.gt_masks.tensor
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": pred}])
    return evaluator.evaluate()


def test_pycocotools_evaluation_exact(tiny_coco, tmp_path):
    _, names = tiny_coco
    perfect = _evaluate(names["val2017"], tmp_path / "a")
    assert perfect["bbox"]["AP"] == pytest.approx(100.0)
    assert perfect["segm"]["AP"] == pytest.approx(100.0)
    assert perfect["segm"]["AP-tri"] == pytest.approx(100.0)  # the RLE-annotated category
    swapped = _evaluate(names["val2017"], tmp_path / "b", swap_classes=True)
    assert swapped["bbox"]["AP"] == pytest.approx(0.0) and swapped["segm"]["AP"] == pytest.approx(0.0)
    # one of the 3 images without predictions: both categories are found at recall 2/3 with precision 1;
    # COCO's AP averages the precision at the 101 recall points 0, .01, ..., 1, of which 67 are <= 2/3
    partial = _evaluate(names["val2017"], tmp_path / "c", drop_image=2)
    for task in ("bbox", "segm"):
        for key in ("AP", "AP50", "AP75", "AP-box", "AP-tri"):
            assert partial[task][key] == pytest.approx(100.0 * 67 / 101), (task, key)
    assert (tmp_path / "a" / "coco_instances_results.json").is_file()


def test_model_inference_through_evaluator(tiny_coco, tmp_path):
    from detectron2.data import build_detection_test_loader
    from detectron2.evaluation import inference_on_dataset

    root, names = tiny_coco
    torch.manual_seed(0)
    cfg = r50_cfg(names)
    model = build_model(cfg).eval()
    name = names["val2017"]
    res = inference_on_dataset(model, build_detection_test_loader(cfg, name),
                               COCOEvaluator(name, output_dir=str(tmp_path), use_fast_impl=False))
    # an untrained model's AP is unknown: what is checked is that the evaluator reports, in percent, what
    # COCOeval computes from the detections it wrote (exact answers: test_pycocotools_evaluation_exact)
    for task in ("bbox", "segm"):
        want = coco_ap_from_results(root / "annotations" / "instances_val2017.json",
                                    tmp_path / "coco_instances_results.json", task)
        assert {k: res[task][k] for k in want} == pytest.approx(want)
