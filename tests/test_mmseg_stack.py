"""Stack check (issue 2): MMSegmentation 1.x on mmcv-lite runs an FCN on a torchvision-style ResNet-50.

A training step and IoUMetric on a tiny dataset the test writes, through mmseg's own dataset,
pipeline, data preprocessor, model and metric.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import transfer.segmentation  # noqa: F401  (compat: mmcv.ops placeholder, weights_only allow-list)
from mmengine.config import ConfigDict
from mmengine.optim import OptimWrapper
from mmengine.structures import PixelData
from mmseg.datasets import BaseSegDataset
from mmseg.evaluation import IoUMetric
from mmseg.models.backbones import ResNet
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from mmseg.utils import register_all_modules

register_all_modules(init_default_scope=True)
torch.set_num_threads(2)


def test_mmcv_ops_placeholder():
    from mmcv.ops import point_sample, sigmoid_focal_loss

    feats = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    points = torch.rand(2, 5, 2)
    got = point_sample(feats, points, align_corners=False)
    want = F.grid_sample(feats, 2 * points.unsqueeze(2) - 1, align_corners=False).squeeze(3)
    assert torch.allclose(got, want)
    with pytest.raises(RuntimeError, match="compiled mmcv op"):
        sigmoid_focal_loss(torch.zeros(1), torch.zeros(1))


def test_torchvision_resnet50_is_mmseg_resnet():
    """Same key names, strict load, and the same features (so no layer is silently re-initialised)."""
    tv = torchvision.models.resnet50().eval()
    mm = ResNet(depth=50, out_indices=(3,))
    mm.eval()  # mmseg's ResNet.train() returns None, so no chaining
    mm.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}, strict=True)
    x = torch.randn(1, 3, 64, 64)
    body = torch.nn.Sequential(*list(tv.children())[:-2])
    with torch.no_grad():
        assert torch.allclose(mm(x)[0], body(x), atol=1e-5)


def _write_tiny_set(root):
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    (root / "ann").mkdir()
    for i in range(2):
        img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        lab = np.zeros((64, 64), np.uint8)
        lab[16:48, 8 + 8 * i: 40 + 8 * i] = 1 + i  # classes 0, 1, 2
        lab[0:4] = 255  # ignored border
        img[lab == 1] = (230, 30, 30)
        Image.fromarray(img).save(root / "img" / f"{i}.png")
        Image.fromarray(lab).save(root / "ann" / f"{i}.png")


def test_fcn_r50_training_step_and_iou_metric(tmp_path):
    _write_tiny_set(tmp_path)
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"), dict(type="PackSegInputs")]
    ds = BaseSegDataset(data_root=str(tmp_path), data_prefix=dict(img_path="img", seg_map_path="ann"),
                        img_suffix=".png", seg_map_suffix=".png", pipeline=pipeline,
                        metainfo=dict(classes=("bg", "a", "b"), palette=[[0, 0, 0], [1, 1, 1], [2, 2, 2]]))
    assert len(ds) == 2
    bn = dict(type="BN", requires_grad=True)
    model = MODELS.build(ConfigDict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                               bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size=(64, 64)),
        backbone=dict(type="ResNet", depth=50, dilations=(1, 1, 1, 2), strides=(1, 2, 2, 1), norm_cfg=bn,
                      contract_dilation=True),
        decode_head=dict(type="FCNHead", in_channels=2048, in_index=3, channels=64, num_convs=2, concat_input=False,
                         dropout_ratio=0.0, dilation=6, num_classes=3, norm_cfg=bn, align_corners=True,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
        train_cfg=dict(), test_cfg=dict(mode="whole")))
    tv = torchvision.models.resnet50()
    model.backbone.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}, strict=False)
    assert torch.equal(model.backbone.layer4[2].conv3.weight, tv.layer4[2].conv3.weight)

    batch = {"inputs": [ds[i]["inputs"] for i in range(2)], "data_samples": [ds[i]["data_samples"] for i in range(2)]}
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    before = model.decode_head.conv_seg.weight.detach().clone()
    model.train()
    logs = model.train_step(batch, optim)
    assert torch.isfinite(logs["loss"]) and 0.3 < float(logs["decode.loss_ce"]) < 5.0  # ~ln(3) at start
    assert not torch.equal(before, model.decode_head.conv_seg.weight)

    model.eval()
    with torch.no_grad():
        outputs = model.test_step(batch)
    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = ds.metainfo
    metric.process(batch, [o.to_dict() for o in outputs])
    got = metric.compute_metrics(metric.results)

    # Independent mIoU from the same predictions: per-class IoU over non-ignored pixels, classes with
    # no ground truth and no prediction are NaN and skipped, as in mmseg.
    inter, union = np.zeros(3), np.zeros(3)
    for o in outputs:
        pred = o.pred_sem_seg.data.squeeze(0).numpy()
        gt = o.gt_sem_seg.data.squeeze(0).numpy()
        valid = gt != 255
        for c in range(3):
            inter[c] += np.sum((pred == c) & (gt == c) & valid)
            union[c] += np.sum(((pred == c) | (gt == c)) & valid)
    want = np.nanmean(np.where(union > 0, inter / np.maximum(union, 1), np.nan)) * 100
    assert got["mIoU"] == pytest.approx(round(want, 2), abs=0.011)


def test_iou_metric_known_answer():
    gt = torch.zeros(1, 4, 4, dtype=torch.long)
    gt[0, :, 2:] = 1
    pred = torch.zeros(1, 4, 4, dtype=torch.long)
    pred[0, :, 1:] = 1  # class 0: IoU 4/8; class 1: IoU 8/12
    sample = SegDataSample()
    sample.gt_sem_seg = PixelData(data=gt)
    sample.pred_sem_seg = PixelData(data=pred)
    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = dict(classes=("a", "b"))
    metric.process({}, [sample.to_dict()])
    res = metric.compute_metrics(metric.results)
    assert res["mIoU"] == pytest.approx(round((0.5 + 8 / 12) / 2 * 100, 2))
    assert res["aAcc"] == pytest.approx(75.0)
