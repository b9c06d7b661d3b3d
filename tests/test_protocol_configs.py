"""The transfer protocol configs against the published protocols, field by field (configs only, no model).

The tables below are the spec. Sources, cited per row group:
  [4.2]  SlotCon paper, Sec. 4.2 "Evaluation protocols": Mask R-CNN R50-FPN in Detectron2, all layers
         fine-tuned, COCO train2017 -> val2017, standard 1x schedule with SyncBN; FCN for VOC and
         Cityscapes "strictly follow [31]" (MoCo): VOC train_aug2012 30k iterations -> val2012,
         Cityscapes train_fine 90k -> val_fine; ADE20K: MMSegmentation's standard 80k schedule.
  [D2]   DESIGN.md, "Transfer: facts": the official COCO_R_50_FPN_1x_SlotCon.yaml on Detectron2's
         defaults (SyncBN, LR 0.02, 90k, steps 60k/80k, batch 16, RGB 0-255 mean/std,
         STRIDE_IN_1X1 False, FREEZE_AT 0, 4conv1fc head, precise BN).
  [MoCo] the authors' MMSegmentation configs for VOC and Cityscapes (MoCo's protocol): ResNet-50 D16
         (conv5 stride 1, dilation 2), FCN head 2 convs of 256 channels with dilation 6, no concat,
         no dropout, align_corners, no auxiliary head; SGD momentum 0.9, wd 1e-4, steps at 70%/90%;
         LR 0.003 (VOC) / 0.01 (Cityscapes); 2 GPUs x 8; Cityscapes slides 769 windows at stride 513.
  [norm] DESIGN.md, "Transfer: facts": those VOC / Cityscapes configs normalise 0-255 pixels with the
         0-1 statistics (to_rgb) and pad with 0 (labels 255); ADE20K uses the 0-255 statistics.
  [mmseg] MMSegmentation's own FCN R50-D8 512x512 80k ADE20K config (the paper's "standard" one).
The entry points load the files as here: Detectron2 get_cfg() + merge_from_file after
transfer.detection.compat; MMSegmentation Config.fromfile after transfer.segmentation.compat.
"""
from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path

import pytest

import transfer.detection.compat  # noqa: F401  (before Detectron2, as in the entry point)
import transfer.segmentation.compat  # noqa: F401  (before mmseg, as in the entry point)
from detectron2.config import get_cfg
from mmengine.config import Config

ROOT = Path(__file__).resolve().parents[1]
SEG = ROOT / "configs" / "segmentation"
DET = ROOT / "configs" / "detection"


class _Missing:
    def __repr__(self) -> str:
        return "<not set, no default>"


MISSING = _Missing()


class OneOf:
    """A spec value satisfied by any of equivalent settings (e.g. an unset flag and its default)."""

    def __init__(self, *values):
        self.values = [_plain(v) for v in values]

    def __eq__(self, other):
        return any(_plain(other) == v for v in self.values)

    def __repr__(self) -> str:
        return f"OneOf{tuple(self.values)}"


def _plain(x):
    """Tuples -> lists, config dicts -> dicts, so YAML/Python spellings of one value compare equal."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# ----------------------------------------------------------------------------- Detectron2
# Mask R-CNN R50-FPN 1x with SyncBN on COCO.
DETECTION_SPEC = {
    # [4.2] Mask R-CNN, R50-FPN, all layers fine-tuned; [D2] torchvision-layout backbone
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.MASK_ON": True,
    "MODEL.BACKBONE.NAME": "build_resnet_fpn_backbone",
    "MODEL.BACKBONE.FREEZE_AT": 0,
    "MODEL.RESNETS.DEPTH": 50,
    "MODEL.RESNETS.NUM_GROUPS": 1,
    "MODEL.RESNETS.WIDTH_PER_GROUP": 64,
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
    "MODEL.RESNETS.RES5_DILATION": 1,
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE": [False, False, False, False],
    "MODEL.RESNETS.OUT_FEATURES": ["res2", "res3", "res4", "res5"],
    # [4.2] SyncBN; [D2] in backbone, FPN, box and mask heads
    "MODEL.RESNETS.NORM": "SyncBN",
    "MODEL.FPN.NORM": "SyncBN",
    "MODEL.FPN.IN_FEATURES": ["res2", "res3", "res4", "res5"],
    "MODEL.FPN.OUT_CHANNELS": 256,
    "MODEL.ANCHOR_GENERATOR.SIZES": [[32], [64], [128], [256], [512]],
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
    "MODEL.RPN.IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"],
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 2000,
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 1000,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": 1000,
    "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
    "MODEL.ROI_HEADS.NAME": "StandardROIHeads",
    "MODEL.ROI_HEADS.IN_FEATURES": ["p2", "p3", "p4", "p5"],
    "MODEL.ROI_HEADS.NUM_CLASSES": 80,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 512,
    # [D2] 4conv1fc box head
    "MODEL.ROI_BOX_HEAD.NAME": "FastRCNNConvFCHead",
    "MODEL.ROI_BOX_HEAD.NUM_CONV": 4,
    "MODEL.ROI_BOX_HEAD.NUM_FC": 1,
    "MODEL.ROI_BOX_HEAD.NORM": "SyncBN",
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 7,
    "MODEL.ROI_MASK_HEAD.NAME": "MaskRCNNConvUpsampleHead",
    "MODEL.ROI_MASK_HEAD.NUM_CONV": 4,
    "MODEL.ROI_MASK_HEAD.NORM": "SyncBN",
    "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": 14,
    # [D2] RGB input, ImageNet statistics in 0-255 (what the torchvision-layout weights expect)
    "INPUT.FORMAT": "RGB",
    "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
    "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
    # [4.2] standard 1x: multi-scale train shorter side 640-800, test 800, max 1333, flips, no crop
    "INPUT.MIN_SIZE_TRAIN": [640, 672, 704, 736, 768, 800],
    "INPUT.MIN_SIZE_TRAIN_SAMPLING": "choice",
    "INPUT.MAX_SIZE_TRAIN": 1333,
    "INPUT.MIN_SIZE_TEST": 800,
    "INPUT.MAX_SIZE_TEST": 1333,
    "INPUT.RANDOM_FLIP": "horizontal",
    "INPUT.CROP.ENABLED": False,
    "INPUT.MASK_FORMAT": "polygon",
    # [4.2] COCO train2017 -> val2017
    "DATASETS.TRAIN": ["coco_2017_train"],
    "DATASETS.TEST": ["coco_2017_val"],
    # [4.2] standard 1x schedule; [D2] LR 0.02, batch 16, 90k, steps 60k/80k, D2's default warm-up
    "SOLVER.IMS_PER_BATCH": 16,
    "SOLVER.REFERENCE_WORLD_SIZE": 0,
    "SOLVER.BASE_LR": 0.02,
    "SOLVER.MOMENTUM": 0.9,
    "SOLVER.NESTEROV": False,
    "SOLVER.WEIGHT_DECAY": 0.0001,
    "SOLVER.WEIGHT_DECAY_NORM": 0.0,
    "SOLVER.BIAS_LR_FACTOR": 1.0,
    "SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR",
    "SOLVER.STEPS": [60000, 80000],
    "SOLVER.GAMMA": 0.1,
    "SOLVER.MAX_ITER": 90000,
    "SOLVER.WARMUP_METHOD": "linear",
    "SOLVER.WARMUP_ITERS": 1000,
    "SOLVER.WARMUP_FACTOR": 0.001,
    "SOLVER.CLIP_GRADIENTS.ENABLED": False,
    "SOLVER.AMP.ENABLED": False,
    # [D2] precise BN before evaluation; single-scale test
    "TEST.PRECISE_BN.ENABLED": True,
    "TEST.PRECISE_BN.NUM_ITER": 200,
    "TEST.AUG.ENABLED": False,
    "TEST.DETECTIONS_PER_IMAGE": 100,
}


def load_detection(path: Path):
    cfg = get_cfg()
    cfg.merge_from_file(str(path))
    return cfg


def detection_mismatches(cfg, spec: dict = DETECTION_SPEC) -> list[str]:
    out = []
    for key, want in spec.items():
        node = cfg
        for part in key.split("."):
            node = node.get(part, MISSING) if node is not MISSING else MISSING
        if not (want == _plain(node) if isinstance(want, OneOf) else _plain(want) == _plain(node)):
            out.append(f"{key}: config has {node!r}, the protocol needs {want!r}")
    return out


def test_detection_protocol_config():
    assert detection_mismatches(load_detection(DET / "mask_rcnn_R50_FPN_1x_syncbn.yaml")) == []


def test_detection_check_catches_a_wrong_value(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{DET / "mask_rcnn_R50_FPN_1x_syncbn.yaml"}"\n'
                   "MODEL:\n  RESNETS:\n    STRIDE_IN_1X1: True\nINPUT:\n  FORMAT: BGR\nSOLVER:\n  BASE_LR: 0.01\n")
    got = detection_mismatches(load_detection(bad))
    assert [m.split(":")[0] for m in got] == ["MODEL.RESNETS.STRIDE_IN_1X1", "INPUT.FORMAT", "SOLVER.BASE_LR"]


# ----------------------------------------------------------------------------- MMSegmentation
PUBLISHED_NORM = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])  # [norm] 0-1 stats, 0-255 pixels
PIXEL255_NORM = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375])  # ImageNet stats, 0-255


def _fcn_d16(*, crop: int, classes: int, norm: dict, lr: float, iters: int, milestones: list[int],
             train_scale: tuple[int, int], test: dict) -> dict:
    """[MoCo] FCN-D16 protocol of VOC and Cityscapes, as the authors ran it."""
    return {
        # [4.2] FCN on a ResNet-50, all layers fine-tuned (nothing frozen, BN trained), SyncBN
        "model.type": "EncoderDecoder",
        "model.backbone.type": "ResNet",  # torchvision stem (conv1/bn1): the converted weights' layout
        "model.backbone.depth": 50,
        "model.backbone.deep_stem": False,
        "model.backbone.frozen_stages": -1,
        "model.backbone.norm_eval": False,
        "model.backbone.norm_cfg.type": "SyncBN",
        "model.backbone.norm_cfg.requires_grad": True,
        "model.backbone.style": "pytorch",
        # [MoCo] D16: conv5 stride 1, dilation 2
        "model.backbone.strides": [1, 2, 2, 1],
        "model.backbone.dilations": [1, 1, 1, 2],
        "model.backbone.contract_dilation": True,
        "model.backbone.multi_grid": None,
        "model.backbone.out_indices": [0, 1, 2, 3],
        # [MoCo] head: 2 convs x 256, dilation 6, no concat, no dropout, align_corners; no auxiliary head
        "model.decode_head.type": "FCNHead",
        "model.decode_head.in_channels": 2048,
        "model.decode_head.in_index": 3,
        "model.decode_head.channels": 256,
        "model.decode_head.num_convs": 2,
        "model.decode_head.kernel_size": 3,
        "model.decode_head.dilation": 6,
        "model.decode_head.concat_input": False,
        "model.decode_head.dropout_ratio": 0.0,
        "model.decode_head.num_classes": classes,
        "model.decode_head.align_corners": True,
        "model.decode_head.norm_cfg.type": "SyncBN",
        "model.decode_head.loss_decode": dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
        "model.auxiliary_head": None,
        "model.test_cfg": test,
        # [norm] pixel statistics, RGB order, padding after normalisation
        "model.data_preprocessor.type": "SegDataPreProcessor",
        "model.data_preprocessor.mean": norm["mean"],
        "model.data_preprocessor.std": norm["std"],
        "model.data_preprocessor.bgr_to_rgb": True,
        "model.data_preprocessor.pad_val": 0,
        "model.data_preprocessor.seg_pad_val": 255,
        "model.data_preprocessor.size": [crop, crop],
        # [MoCo] SGD, wd 1e-4, x0.1 at 70% and 90%, no warm-up; [4.2] iterations; total batch 16
        "optim_wrapper.optimizer": dict(type="SGD", lr=lr, momentum=0.9, weight_decay=0.0001),
        "optim_wrapper.clip_grad": None,
        "optim_wrapper.paramwise_cfg": MISSING,
        "param_scheduler": [dict(type="MultiStepLR", by_epoch=False, begin=0, end=iters,
                                 milestones=milestones, gamma=0.1)],
        "train_cfg.type": "IterBasedTrainLoop",
        "train_cfg.max_iters": iters,
        "total_batch_size": 16,
        "_train_pipeline": [
            ("LoadImageFromFile", {}),
            ("LoadAnnotations", {"reduce_zero_label": OneOf(None, False)}),
            ("RandomResize", {"scale": list(train_scale), "ratio_range": [0.5, 2.0], "keep_ratio": True,
                              "resize_type": "Resize"}),
            ("RandomCrop", {"crop_size": [crop, crop], "cat_max_ratio": 1.0}),
            ("RandomFlip", {"prob": 0.5, "direction": "horizontal"}),
            ("PackSegInputs", {}),
        ],
        "_test_pipeline": [
            ("LoadImageFromFile", {}),
            ("Resize", {"scale": list(train_scale), "keep_ratio": True, "scale_factor": None}),
            ("LoadAnnotations", {"reduce_zero_label": OneOf(None, False)}),
            ("PackSegInputs", {}),
        ],
    }


_VOC = dict(crop=513, classes=21, lr=0.003, iters=30000, milestones=[21000, 27000], train_scale=(2049, 513),
            test=dict(mode="whole"))
_VOC_DATA = {
    # [4.2] train_aug2012 (train + SBD aug) -> val2012
    "train_dataloader.dataset.type": "ConcatDataset",
    "train_dataloader.dataset.datasets.0.type": "PascalVOCDataset",
    "train_dataloader.dataset.datasets.0.ann_file": "ImageSets/Segmentation/train.txt",
    "train_dataloader.dataset.datasets.0.data_prefix.seg_map_path": "SegmentationClass",
    "train_dataloader.dataset.datasets.1.type": "PascalVOCDataset",
    "train_dataloader.dataset.datasets.1.ann_file": "ImageSets/Segmentation/aug.txt",
    "train_dataloader.dataset.datasets.1.data_prefix.seg_map_path": "SegmentationClassAug",
    "val_dataloader.dataset.type": "PascalVOCDataset",
    "val_dataloader.dataset.ann_file": "ImageSets/Segmentation/val.txt",
    "val_dataloader.batch_size": 1,
    "val_evaluator.iou_metrics": ["mIoU"],
}
_CITY = dict(crop=769, classes=19, lr=0.01, iters=90000, milestones=[63000, 81000], train_scale=(2049, 1025),
             test=dict(mode="slide", crop_size=[769, 769], stride=[513, 513]))
_CITY_DATA = {
    # [4.2] train_fine -> val_fine
    "train_dataloader.dataset.type": "CityscapesDataset",
    "train_dataloader.dataset.data_prefix": dict(img_path="leftImg8bit/train", seg_map_path="gtFine/train"),
    "val_dataloader.dataset.type": "CityscapesDataset",
    "val_dataloader.dataset.data_prefix": dict(img_path="leftImg8bit/val", seg_map_path="gtFine/val"),
    "val_dataloader.batch_size": 1,
    "val_evaluator.iou_metrics": ["mIoU"],
}

ADE20K_SPEC = {
    # [4.2] "the standard 80k iterations schedule of MMSegmentation"; [mmseg] FCN R50-D8, SyncBN
    "model.type": "EncoderDecoder",
    "model.backbone.type": "ResNet",
    "model.backbone.depth": 50,
    "model.backbone.deep_stem": False,
    "model.backbone.frozen_stages": -1,
    "model.backbone.norm_eval": False,
    "model.backbone.norm_cfg.type": "SyncBN",
    "model.backbone.style": "pytorch",
    "model.backbone.strides": [1, 2, 1, 1],  # D8: conv4 and conv5 dilated
    "model.backbone.dilations": [1, 1, 2, 4],
    "model.backbone.contract_dilation": True,
    "model.backbone.multi_grid": None,
    "model.backbone.out_indices": [0, 1, 2, 3],
    "model.decode_head.type": "FCNHead",
    "model.decode_head.in_channels": 2048,
    "model.decode_head.in_index": 3,
    "model.decode_head.channels": 512,
    "model.decode_head.num_convs": 2,
    "model.decode_head.kernel_size": 3,
    "model.decode_head.dilation": 1,
    "model.decode_head.concat_input": True,
    "model.decode_head.dropout_ratio": 0.1,
    "model.decode_head.num_classes": 150,
    "model.decode_head.align_corners": False,
    "model.decode_head.norm_cfg.type": "SyncBN",
    "model.decode_head.loss_decode": dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    # [mmseg] auxiliary FCN head on conv4, loss weight 0.4
    "model.auxiliary_head.type": "FCNHead",
    "model.auxiliary_head.in_channels": 1024,
    "model.auxiliary_head.in_index": 2,
    "model.auxiliary_head.channels": 256,
    "model.auxiliary_head.num_convs": 1,
    "model.auxiliary_head.concat_input": False,
    "model.auxiliary_head.dropout_ratio": 0.1,
    "model.auxiliary_head.num_classes": 150,
    "model.auxiliary_head.align_corners": False,
    "model.auxiliary_head.norm_cfg.type": "SyncBN",
    "model.auxiliary_head.loss_decode": dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4),
    "model.test_cfg": dict(mode="whole"),
    # [norm] ADE20K: ImageNet statistics in 0-255, RGB, padding 0 / 255
    "model.data_preprocessor.type": "SegDataPreProcessor",
    "model.data_preprocessor.mean": PIXEL255_NORM["mean"],
    "model.data_preprocessor.std": PIXEL255_NORM["std"],
    "model.data_preprocessor.bgr_to_rgb": True,
    "model.data_preprocessor.pad_val": 0,
    "model.data_preprocessor.seg_pad_val": 255,
    "model.data_preprocessor.size": [512, 512],
    # [mmseg] SGD lr 0.01, momentum 0.9, wd 5e-4, poly(0.9) to 1e-4 over 80k, no warm-up; batch 16
    "optim_wrapper.optimizer": dict(type="SGD", lr=0.01, momentum=0.9, weight_decay=0.0005),
    "optim_wrapper.clip_grad": None,
    "optim_wrapper.paramwise_cfg": MISSING,
    "param_scheduler": [dict(type="PolyLR", eta_min=1e-4, power=0.9, begin=0, end=80000, by_epoch=False)],
    "train_cfg.type": "IterBasedTrainLoop",
    "train_cfg.max_iters": 80000,
    "total_batch_size": 16,
    "_train_pipeline": [
        ("LoadImageFromFile", {}),
        ("LoadAnnotations", {"reduce_zero_label": True}),
        ("RandomResize", {"scale": [2048, 512], "ratio_range": [0.5, 2.0], "keep_ratio": True,
                          "resize_type": "Resize"}),
        ("RandomCrop", {"crop_size": [512, 512], "cat_max_ratio": 0.75}),
        ("RandomFlip", {"prob": 0.5, "direction": "horizontal"}),
        ("PhotoMetricDistortion", {"brightness_delta": 32, "contrast_range": [0.5, 1.5],
                                   "saturation_range": [0.5, 1.5], "hue_delta": 18}),
        ("PackSegInputs", {}),
    ],
    "_test_pipeline": [
        ("LoadImageFromFile", {}),
        ("Resize", {"scale": [2048, 512], "keep_ratio": True, "scale_factor": None}),
        ("LoadAnnotations", {"reduce_zero_label": True}),
        ("PackSegInputs", {}),
    ],
    "train_dataloader.dataset.type": "ADE20KDataset",
    "train_dataloader.dataset.data_prefix": dict(img_path="images/training", seg_map_path="annotations/training"),
    "val_dataloader.dataset.type": "ADE20KDataset",
    "val_dataloader.dataset.data_prefix": dict(img_path="images/validation",
                                               seg_map_path="annotations/validation"),
    "val_dataloader.batch_size": 1,
    "val_evaluator.iou_metrics": ["mIoU"],
}

SEGMENTATION_SPECS = {
    # As published: what `python -m slurm collect` compares with the paper.
    "fcn_d6_r50-d16_513x513_30k_voc12aug.py": {**_fcn_d16(**_VOC, norm=PUBLISHED_NORM), **_VOC_DATA},
    "fcn_d6_r50-d16_769x769_90k_cityscapes.py": {**_fcn_d16(**_CITY, norm=PUBLISHED_NORM), **_CITY_DATA},
    "fcn_r50-d8_512x512_80k_ade20k.py": ADE20K_SPEC,
    # The same protocols with the pretraining's normalisation (0-255 statistics); nothing else differs.
    "fcn_d6_r50-d16_513x513_30k_voc12aug_imagenetnorm.py": {**_fcn_d16(**_VOC, norm=PIXEL255_NORM), **_VOC_DATA},
    "fcn_d6_r50-d16_769x769_90k_cityscapes_imagenetnorm.py": {**_fcn_d16(**_CITY, norm=PIXEL255_NORM),
                                                              **_CITY_DATA},
}


@functools.lru_cache(maxsize=None)
def _registries():
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS, TRANSFORMS
    import mmseg.datasets  # noqa: F401  (registers the transforms)
    import mmseg.models  # noqa: F401  (registers the backbones and heads)

    init_default_scope("mmseg")
    return MODELS, TRANSFORMS


def _ctor_default(type_name: str, key: str, registry: str):
    """The default an unset key takes: the parameter's default in the registered class (or a base class)."""
    models, transforms = _registries()
    cls = (models if registry == "models" else transforms).get(type_name)
    for klass in getattr(cls, "__mro__", ()):
        if "__init__" not in vars(klass):
            continue
        p = inspect.signature(klass.__init__).parameters.get(key)
        if p is not None and p.default is not inspect.Parameter.empty:
            return p.default
    return MISSING


def _lookup(cfg, path: str):
    node = cfg
    parts = path.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, (list, tuple)):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        elif i == len(parts) - 1 and isinstance(node, dict) and "type" in node and path.startswith("model."):
            return _ctor_default(node["type"], part, "models")
        else:
            return MISSING
    return node


def _pipelines(cfg, which: str) -> list:
    """The pipelines the datasets actually use (not the top-level variables, which nothing reads)."""
    ds = cfg[f"{which}_dataloader"]["dataset"]
    return [d["pipeline"] for d in ds["datasets"]] if "datasets" in ds else [ds["pipeline"]]


def _pipeline_mismatches(pipeline: list, spec: list, where: str) -> list[str]:
    got_types = [t["type"] for t in pipeline]
    want_types = [t for t, _ in spec]
    if got_types != want_types:
        return [f"{where}: transforms {got_types}, the protocol needs {want_types}"]
    out = []
    for t, (name, params) in zip(pipeline, spec):
        for key, want in params.items():
            got = t[key] if key in t else _ctor_default(name, key, "transforms")
            if not (want == got if isinstance(want, OneOf) else _plain(want) == _plain(got)):
                out.append(f"{where}.{name}.{key}: config has {got!r}, the protocol needs {want!r}")
    return out


def segmentation_mismatches(cfg: Config, spec: dict) -> list[str]:
    cfg = cfg.to_dict()
    out = []
    for key, want in spec.items():
        if key in ("_train_pipeline", "_test_pipeline"):
            which = "train" if key == "_train_pipeline" else "val"
            for i, pipe in enumerate(_pipelines(cfg, which)):
                out += _pipeline_mismatches(pipe, want, f"{which}_dataloader.pipeline[{i}]")
            continue
        got = _lookup(cfg, key)
        ok = (want == got) if isinstance(want, OneOf) else (
            got is MISSING if want is MISSING else _plain(want) == _plain(got))
        if not ok:
            out.append(f"{key}: config has {got!r}, the protocol needs {want!r}")
    return out


@pytest.mark.parametrize("name", list(SEGMENTATION_SPECS))
def test_segmentation_protocol_config(name):
    cfg = Config.fromfile(str(SEG / name))
    assert segmentation_mismatches(cfg, SEGMENTATION_SPECS[name]) == []


def test_segmentation_check_catches_a_wrong_value(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(f"_base_ = {str(SEG / 'fcn_d6_r50-d16_769x769_90k_cityscapes.py')!r}\n"
                   "data_preprocessor = dict(mean=[123.675, 116.28, 103.53])\n"
                   "model = dict(data_preprocessor=data_preprocessor, backbone=dict(frozen_stages=1),\n"
                   "             decode_head=dict(dilation=1))\n"
                   "train_dataloader = dict(dataset=dict(pipeline=[dict(type='LoadImageFromFile'),\n"
                   "    dict(type='LoadAnnotations'),\n"
                   "    dict(type='RandomResize', scale=(2048, 1024), ratio_range=(0.5, 2.0), keep_ratio=True),\n"
                   "    dict(type='RandomCrop', crop_size=(769, 769), cat_max_ratio=0.75),\n"
                   "    dict(type='RandomFlip', prob=0.5), dict(type='PackSegInputs')]))\n")
    got = segmentation_mismatches(Config.fromfile(str(bad)), SEGMENTATION_SPECS["fcn_d6_r50-d16_769x769_90k_cityscapes.py"])
    assert sorted(m.split(":")[0] for m in got) == sorted([
        "model.backbone.frozen_stages", "model.decode_head.dilation", "model.data_preprocessor.mean",
        "train_dataloader.pipeline[0].RandomResize.scale", "train_dataloader.pipeline[0].RandomCrop.cat_max_ratio"])


def test_variants_differ_from_the_published_configs_only_in_normalisation():
    for published in ("fcn_d6_r50-d16_513x513_30k_voc12aug", "fcn_d6_r50-d16_769x769_90k_cityscapes"):
        a = Config.fromfile(str(SEG / f"{published}.py")).to_dict()
        b = Config.fromfile(str(SEG / f"{published}_imagenetnorm.py")).to_dict()
        for cfg in (a, b):
            cfg["model"]["data_preprocessor"].pop("mean")
            cfg["model"]["data_preprocessor"].pop("std")
            cfg["data_preprocessor"].pop("mean")
            cfg["data_preprocessor"].pop("std")
        assert a == b


# ----------------------------------------------------------------------------- which config is compared
def test_transfer_tasks_run_the_as_published_configs():
    from slurm.transfer import TASKS

    assert TASKS["det"].config == "configs/detection/mask_rcnn_R50_FPN_1x_syncbn.yaml"
    assert TASKS["voc"].config == "configs/segmentation/fcn_d6_r50-d16_513x513_30k_voc12aug.py"
    assert TASKS["cityscapes"].config == "configs/segmentation/fcn_d6_r50-d16_769x769_90k_cityscapes.py"
    assert TASKS["ade20k"].config == "configs/segmentation/fcn_r50-d8_512x512_80k_ade20k.py"


def test_collect_does_not_compare_another_config_with_the_paper(tmp_path):
    from slurm import registry
    from slurm.collect import collect

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    folder = tmp_path / "submitit"
    registry.add_job(run_dir, kind="pretrain", job_id="7", name="x", cluster="slurm", submitit_folder=folder,
                     num_tasks=1, extra={"config": "/x/configs/pretrain/slotcon_coco_r50_800ep.yaml"})
    configs = {"voc": "/elsewhere/configs/segmentation/fcn_d6_r50-d16_513x513_30k_voc12aug.py",
               "cityscapes": str(SEG / "fcn_d6_r50-d16_769x769_90k_cityscapes_imagenetnorm.py")}
    for i, (task, config) in enumerate(configs.items()):
        path = run_dir / "transfer" / task / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"metrics": {"mIoU": 70.0}}))
        registry.add_job(run_dir, kind="transfer", job_id=str(10 + i), name=task, cluster="slurm",
                         submitit_folder=folder, num_tasks=1, extra={"task": task, "config": config,
                                                                    "metrics": str(path)})
    md, data = collect(run_dir)
    diff = [c.strip() for c in next(line for line in md.splitlines() if line.startswith("| difference")).split("|")]
    assert diff[4] == "–" and diff[5] == "-1.6"  # Cityscapes ran the variant; VOC the published config
    assert list(data["not_published_protocol"]) == ["mIoU_cityscapes"]
    assert "_imagenetnorm.py" in md
