"""``python -m transfer.detection``: protocol config, refusals, and an end-to-end toy run.

The end-to-end run converts a checkpoint of the project's own method, fine-tunes Mask R-CNN for a
few iterations on the toy scenes and evaluates with pycocotools.
"""
from __future__ import annotations

import argparse
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import transfer.detection.compat  # noqa: F401
from pretrain.data.toy_scenes import make_toy_scenes
from tests.test_detectron2_stack import coco_ap_from_results
from tools.convert_to_d2 import main as convert_main
from transfer.detection.convert import rename_key
from transfer.detection.train import BackboneWeightsError, build_parser, main, setup_cfg

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = REPO / "configs/detection/mask_rcnn_R50_FPN_1x_syncbn.yaml"
SMOKE = REPO / "configs/detection/mask_rcnn_FPN_smoke_cpu.yaml"
TINY = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "64"]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return make_toy_scenes(tmp_path_factory.mktemp("toy") / "toy", n_train=4, n_val=2, size=64, seed=0)


def _pretrain_overrides(toy_root: Path, run_dir: Path) -> list[str]:
    """The project's own SlotCon pretraining at toy size: ResNet-18, 64 px, two steps on the CPU."""
    o = {
        "name": "d2", "data.dataset": "toy", "data.root": str(toy_root), "data.loader": "pil",
        "data.image_size": 64, "data.num_workers": 0, "model.arch": "resnet18", "model.dim_hidden": 64,
        "model.dim_out": 32, "model.num_prototypes": 8, "optim.batch_size": 4, "optim.warmup_epochs": 1,
        "train.epochs": 2, "train.amp": "none", "train.channels_last": False, "train.device": "cpu",
        "train.run_dir": str(run_dir), "train.checkpoint_every_steps": 1, "log.every_steps": 1,
        "log.image_every_steps": 0, "log.progress_bar": False,
    }
    return [f"{k}={v}" for k, v in o.items()]


@pytest.fixture(scope="module")
def pretrained_pkl(toy_root, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """Convert a checkpoint written by the project's pretraining; return the .pkl and the teacher encoder."""
    from pretrain.config import load_config
    from pretrain.engine.checkpoint import list_checkpoints
    from pretrain.train import run

    d = tmp_path_factory.mktemp("pretrain")
    torch.manual_seed(0)
    res = run(load_config(None, _pretrain_overrides(toy_root, d / "run")))
    assert res.status == "finished" and res.step == 2
    ckpt = list_checkpoints(res.run_dir / "checkpoints")[0]
    model = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    teacher = {k[len("teacher_encoder."):]: v for k, v in model.items()
               if k.startswith("teacher_encoder.") and not k.endswith("num_batches_tracked")}
    assert convert_main([str(ckpt), str(d / "r18.pkl")]) == 0
    # the exported teacher backbone of the same run converts to the same weights
    assert convert_main([str(res.run_dir / "teacher_backbone.pth"), str(d / "exported.pkl")]) == 0
    a, b = (pickle.load(open(d / n, "rb"))["model"] for n in ("r18.pkl", "exported.pkl"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    for k, v in teacher.items():
        np.testing.assert_array_equal(a[rename_key(k)], v.numpy())
    return d / "r18.pkl", teacher


def test_protocol_config_and_syncbn_fallback(tmp_path):
    from detectron2.config import get_cfg

    raw = get_cfg()
    raw.merge_from_file(str(PROTOCOL))
    m = raw.MODEL
    assert (m.RESNETS.NORM, m.FPN.NORM, m.ROI_BOX_HEAD.NORM, m.ROI_MASK_HEAD.NORM) == ("SyncBN",) * 4
    assert m.BACKBONE.FREEZE_AT == 0 and m.RESNETS.STRIDE_IN_1X1 is False and m.RESNETS.DEPTH == 50
    assert (m.ROI_BOX_HEAD.NUM_CONV, m.ROI_BOX_HEAD.NUM_FC, m.ROI_MASK_HEAD.NUM_CONV) == (4, 1, 4)
    assert m.PIXEL_MEAN == pytest.approx([0.485 * 255, 0.456 * 255, 0.406 * 255])
    assert m.PIXEL_STD == pytest.approx([0.229 * 255, 0.224 * 255, 0.225 * 255])
    assert raw.INPUT.FORMAT == "RGB" and raw.TEST.PRECISE_BN.ENABLED
    s = raw.SOLVER
    assert (s.MAX_ITER, tuple(s.STEPS), s.IMS_PER_BATCH, s.BASE_LR) == (90000, (60000, 80000), 16, 0.02)

    args = build_parser().parse_args(["--config", str(PROTOCOL), "--weights", "w.pkl",
                                      "--output-dir", str(tmp_path), "SOLVER.BASE_LR", "0.01"])
    cfg = setup_cfg(args)
    if not torch.cuda.is_available():
        assert cfg.MODEL.DEVICE == "cpu"
    # one process (and/or CPU): SyncBN cannot run, plain BN everywhere it was requested
    assert (cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM, cfg.MODEL.ROI_BOX_HEAD.NORM) == ("BN",) * 3
    assert cfg.SOLVER.BASE_LR == 0.01 and cfg.MODEL.WEIGHTS == "w.pkl" and cfg.OUTPUT_DIR == str(tmp_path)


def test_refuses_missing_inputs(tmp_path, capsys):
    assert main(["--config", str(SMOKE), "--weights", str(tmp_path / "none.pkl"),
                 "--data-root", str(tmp_path / "coco")]) == 2
    err = capsys.readouterr().err
    assert "weights not found" in err and "none.pkl" in err
    assert "instances_train2017.json" in err and "instances_val2017.json" in err and "train2017" in err

    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "annotations" / "instances_train2017.json").write_text("{}")
    (tmp_path / "coco" / "train2017").mkdir()
    assert main(["--config", str(SMOKE), "--weights", "scratch", "--data-root", str(tmp_path / "coco")]) == 2
    err = capsys.readouterr().err
    assert "val2017" in err and "instances_train2017.json," not in err  # only what is missing is named


def test_wrong_class_count_refused(toy_root, r18_pkl, tmp_path):
    with pytest.raises(ValueError, match="has 5 categories.*MODEL.ROI_HEADS.NUM_CLASSES 5"):
        main(["--config", str(SMOKE), "--weights", str(r18_pkl), "--data-root", str(toy_root),
              "--output-dir", str(tmp_path), "MODEL.ROI_HEADS.NUM_CLASSES", "80", *TINY])


def test_depth_mismatch_stops_before_training(toy_root, r18_pkl, tmp_path):
    with pytest.raises(BackboneWeightsError, match="randomly initialised"):
        main(["--config", str(SMOKE), "--weights", str(r18_pkl), "--data-root", str(toy_root),
              "--output-dir", str(tmp_path), "MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS", "256",
              *TINY])
    assert not (tmp_path / "model_final.pth").exists() and not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_end_to_end_toy_finetune_and_eval(toy_root, pretrained_pkl, tmp_path):
    torch.manual_seed(0)
    pkl, _ = pretrained_pkl
    out = tmp_path / "run"
    common = ["--config", str(SMOKE), "--data-root", str(toy_root)]
    assert main([*common, "--weights", str(pkl), "--output-dir", str(out), "SOLVER.MAX_ITER", "3",
                 "SOLVER.STEPS", "(2,)", *TINY]) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    # a 3-iteration detector's AP is unknown; metrics.json must hold, in percent, what COCOeval computes
    # from the detections written beside it (exact answers: test_eval_only_metrics_known_answers)
    for task in ("bbox", "segm"):
        want = coco_ap_from_results(toy_root / "annotations" / "instances_val2017.json",
                                    out / "inference" / "coco_instances_results.json", task)
        for key in ("AP", "AP50", "AP75"):
            v = metrics[task][key]
            assert isinstance(v, float) and math.isfinite(v) and v == pytest.approx(want[key]), (task, key)
    assert metrics["max_iter"] == 3 and metrics["weights"] == str(pkl) and metrics["eval_only"] is False
    train_log = [json.loads(line) for line in (out / "train_metrics.json").read_text().splitlines()]
    last = [r for r in train_log if "total_loss" in r][-1]
    assert last["iteration"] == 2 and math.isfinite(last["total_loss"])
    assert (out / "config.yaml").is_file() and (out / "model_final.pth").is_file()
    assert (out / "inference" / "coco_instances_results.json").is_file()

    # a requeued job resumes from the last checkpoint and continues the iteration count
    assert main([*common, "--weights", str(pkl), "--output-dir", str(out), "--resume", "SOLVER.MAX_ITER", "4",
                 "SOLVER.STEPS", "(2,)", *TINY]) == 0
    iters = [r["iteration"] for r in map(json.loads, (out / "train_metrics.json").read_text().splitlines())
             if "total_loss" in r]
    assert iters[-1] == 3 and iters.count(2) == 1
    assert json.loads((out / "metrics.json").read_text())["max_iter"] == 4
    metrics = json.loads((out / "metrics.json").read_text())

    # the saved detector (precise-BN statistics included) evaluates to exactly the same numbers
    ev = tmp_path / "eval"
    assert main([*common, "--weights", str(out / "model_final.pth"), "--output-dir", str(ev), "--eval-only",
                 *TINY]) == 0
    again = json.loads((ev / "metrics.json").read_text())
    assert again["eval_only"] is True
    assert again["bbox"] == metrics["bbox"] and again["segm"] == metrics["segm"]

    # evaluating a bare backbone would measure random heads: refused
    with pytest.raises(BackboneWeightsError, match="model tensors"):
        main([*common, "--weights", str(pkl), "--output-dir", str(tmp_path / "bad"), "--eval-only", *TINY])


class _GroundTruthDetector(torch.nn.Module):
    """Predicts each val image's ground-truth boxes and masks with score 1 (none for ``drop_images``)."""

    def __init__(self, drop_images: frozenset[int] = frozenset()):
        super().__init__()
        self.drop_images = drop_images

    def forward(self, batched_inputs):
        from detectron2.data import DatasetCatalog
        from detectron2.data import detection_utils as d2utils
        from detectron2.structures import Instances

        from transfer.detection.datasets import VAL_NAME

        by_id = {d["image_id"]: d for d in DatasetCatalog.get(VAL_NAME)}
        outs = []
        for x in batched_inputs:
            d = by_id[x["image_id"]]
            hw = (d["height"], d["width"])
            gt = d2utils.annotations_to_instances(d["annotations"], hw, mask_format="bitmask")
            if x["image_id"] in self.drop_images:
                gt = gt[[]]
            pred = Instances(hw, pred_boxes=gt.gt_boxes, scores=torch.ones(len(gt)), pred_classes=gt.gt_classes,
                             pred_masks=gt.gt_masks.tensor)
            outs.append({"instances": pred})
        return outs


class _NoCheckpoint:
    def __init__(self, *args, **kwargs):
        pass

    def resume_or_load(self, *args, **kwargs):
        return {}


def test_eval_only_metrics_known_answers(toy_root, r18_pkl, tmp_path, monkeypatch):
    """``--eval-only`` end to end (Trainer.test, the COCO evaluator, metrics.json) on a detector whose AP
    is known: the ground truth itself, then the ground truth with the first val image's removed."""
    import transfer.detection.train as det_train

    ann = json.loads((toy_root / "annotations" / "instances_val2017.json").read_text())
    cats = {c["id"]: c["name"] for c in ann["categories"]}
    first = min(im["id"] for im in ann["images"])
    total = {c: sum(a["category_id"] == c for a in ann["annotations"]) for c in cats}
    kept = {c: sum(a["category_id"] == c and a["image_id"] != first for a in ann["annotations"]) for c in cats}
    assert all(total.values()) and any(kept[c] < total[c] for c in cats)

    def metrics_of(detector, out):
        monkeypatch.setattr(det_train.Trainer, "build_model", classmethod(lambda cls, cfg: detector))
        monkeypatch.setattr(det_train, "StrictBackboneCheckpointer", _NoCheckpoint)
        assert main(["--config", str(SMOKE), "--data-root", str(toy_root), "--weights", str(r18_pkl),
                     "--output-dir", str(out), "--eval-only", *TINY]) == 0
        return json.loads((out / "metrics.json").read_text())

    perfect = metrics_of(_GroundTruthDetector(), tmp_path / "perfect")
    assert perfect["eval_only"] is True
    for task in ("bbox", "segm"):
        for key in ("AP", "AP50", "AP75", *(f"AP-{n}" for n in cats.values())):
            assert perfect[task][key] == pytest.approx(100.0), (task, key)

    # Every kept prediction is a true positive at every IoU threshold, so category c reaches recall
    # kept/total at precision 1 and none beyond: its AP is the share of COCO's 101 recall points
    # 0, .01, ..., 1 at or below that recall (compared in float as pycocotools does); AP is their mean.
    partial = metrics_of(_GroundTruthDetector(frozenset({first})), tmp_path / "partial")
    recall_points = np.linspace(0.0, 1.0, 101)
    want = {n: 100.0 * np.sum(recall_points <= kept[c] / total[c]) / 101 for c, n in cats.items()}
    for task in ("bbox", "segm"):
        for n, v in want.items():
            assert partial[task][f"AP-{n}"] == pytest.approx(v), (task, n)
        for key in ("AP", "AP50", "AP75"):
            assert partial[task][key] == pytest.approx(np.mean(list(want.values()))), (task, key)


def test_parser_accepts_distributed_flags():
    args = build_parser().parse_args(["--config", "c.yaml", "--weights", "w.pkl", "--num-gpus", "8",
                                      "--num-machines", "2", "--machine-rank", "1", "--dist-url",
                                      "tcp://node0:29500", "--resume", "SOLVER.MAX_ITER", "10"])
    assert (args.num_gpus, args.num_machines, args.machine_rank, args.resume) == (8, 2, 1, True)
    assert args.dist_url == "tcp://node0:29500" and args.opts == ["SOLVER.MAX_ITER", "10"]
    assert isinstance(args, argparse.Namespace)
