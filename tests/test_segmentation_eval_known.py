"""``python -m transfer.segmentation --eval-only`` on a segmentor whose mIoU is known.

The training tests (tests/test_segmentation_transfer.py) fine-tune for two iterations, whose mIoU no
one can know; here the same path (the demo config's test loader and IoUMetric, the runner's test
loop, the metrics JSON the entry point writes and returns) scores the ground truth itself, and the
ground truth with one image's circles labelled squares, whose IoUs follow from pixel counts.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import transfer.segmentation  # noqa: F401
from pretrain.data.toy_scenes import make_toy_scenes
from transfer.segmentation.train import SegArgs, run

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "segmentation" / "fcn_r18-d16_toy_scenes_demo.py"
CIRCLE, SQUARE = 1, 2


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return make_toy_scenes(tmp_path_factory.mktemp("toy") / "toy", n_train=2, n_val=3, size=64, seed=0)


def _oracle(relabel: str | None):
    """A segmentor predicting each image's ground truth; in the image named ``relabel`` circles become squares."""
    from mmengine.model import BaseModel
    from mmengine.structures import PixelData

    class GroundTruthSegmentor(BaseModel):
        def forward(self, inputs, data_samples=None, mode="tensor"):
            assert mode == "predict"
            for s in data_samples:
                gt = s.gt_sem_seg.data.clone()
                if Path(s.img_path).stem == relabel:
                    gt[gt == CIRCLE] = SQUARE
                s.pred_sem_seg = PixelData(data=gt)
            return data_samples

    return GroundTruthSegmentor()


def _eval_only(toy_root: Path, work: Path, monkeypatch, relabel: str | None = None) -> dict:
    from mmengine.runner import Runner

    ckpt = work / "model.pth"
    work.mkdir(parents=True)
    torch.save({"state_dict": {}, "meta": {}}, ckpt)  # --eval-only needs a checkpoint; the oracle has no weights
    monkeypatch.setattr(Runner, "build_model", lambda self, model: _oracle(relabel))
    rec = run(SegArgs(config=str(CONFIG), eval_only=True, checkpoint=str(ckpt), data_root=str(toy_root),
                      work_dir=str(work)))
    assert json.loads((work / "test_metrics.json").read_text()) == rec
    assert rec["images"] == {"test": 3}
    return rec["metrics"]


def test_eval_only_scores_known_answers(toy_root, tmp_path, monkeypatch):
    perfect = _eval_only(toy_root, tmp_path / "perfect", monkeypatch)
    assert perfect == {"aAcc": 100.0, "mIoU": 100.0, "mAcc": 100.0}

    labels = {p.stem: np.asarray(Image.open(p)) for p in sorted((toy_root / "semantic" / "val2017").glob("*.png"))}
    counts = np.bincount(np.concatenate([v.ravel() for v in labels.values()]), minlength=6)
    assert len(counts) == 6 and (counts > 0).all()  # every class is in the mean
    first = min(labels)
    m = int((labels[first] == CIRCLE).sum())
    n1, n2, n = int(counts[CIRCLE]), int(counts[SQUARE]), int(counts.sum())
    assert 0 < m < n1
    got = _eval_only(toy_root, tmp_path / "relabelled", monkeypatch, relabel=first)
    # circle: TP n1 - m of n1 (no false positives); square: TP n2, FP m; the other four classes exact.
    # mmseg reports percentages rounded to 2 decimals.
    iou1, iou2 = (n1 - m) / n1, n2 / (n2 + m)
    assert got["mIoU"] == pytest.approx(100 * (4 + iou1 + iou2) / 6, abs=0.006)
    assert got["mAcc"] == pytest.approx(100 * (5 + iou1) / 6, abs=0.006)  # circle's recall is its IoU here
    assert got["aAcc"] == pytest.approx(100 * (n - m) / n, abs=0.006)
