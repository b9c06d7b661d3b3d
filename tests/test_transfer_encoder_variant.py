"""The demo encoder's variant (no stem max-pool) rebuilt exactly in Detectron2 and MMSegmentation, and refused
where a config would build another network from the same keys."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

import transfer.detection.compat  # noqa: F401
import transfer.segmentation.backbones  # noqa: F401  (registers ResNetStemVariant)
import transfer.segmentation.toy_scenes  # noqa: F401  (registers ToyScenesDataset)
from pretrain.models.encoder import build_encoder
from transfer.checkpoint_io import CheckpointError

REPO = Path(__file__).resolve().parents[1]
D2_DEMO = REPO / "configs/detection/mask_rcnn_R18_FPN_toy_scenes_demo.yaml"
D2_SMOKE = REPO / "configs/detection/mask_rcnn_FPN_smoke_cpu.yaml"
SEG_DEMO = REPO / "configs/segmentation/fcn_r18-d16_toy_scenes_demo.py"


def _trained_like_encoder(stem_pool: bool) -> torch.nn.Module:
    """A ResNet-18 encoder with non-trivial BN statistics (eval mode uses them), as after pretraining."""
    torch.manual_seed(0)
    enc = build_encoder("resnet18", stem_pool=stem_pool)
    for m in enc.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return enc.eval()


def _ckpt(tmp: Path, enc: torch.nn.Module, stem_pool: bool) -> Path:
    path = tmp / "ckpt.pth"
    state = {f"teacher_encoder.{k}": v for k, v in enc.state_dict().items()}
    torch.save({"model": state, "step": 1, "config": {"model": {"arch": "resnet18", "stem_pool": stem_pool}}}, path)
    return path


def _d2_cfg(path: Path):
    from detectron2.config import get_cfg

    from transfer.detection.backbones import add_stem_pool_key

    cfg = get_cfg()
    add_stem_pool_key(cfg)
    cfg.merge_from_file(str(path))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_d2_variant_backbone_is_the_pretrained_encoder(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_backbone

    from tools.convert_to_d2 import convert

    enc = _trained_like_encoder(stem_pool=False)
    convert(_ckpt(tmp_path, enc, False), tmp_path / "w.pkl")
    backbone = build_backbone(_d2_cfg(D2_DEMO)).eval()
    DetectionCheckpointer(backbone.bottom_up).load(str(tmp_path / "w.pkl"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = enc(x), backbone.bottom_up(x)["res5"]
    assert theirs.shape == ours.shape == (2, 512, 4, 4)  # stride 16: no stem max-pool
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert {k: v.stride for k, v in backbone.output_shape().items()} == {"p2": 4, "p3": 8, "p4": 16, "p5": 32}


def test_d2_converted_file_records_the_stem_and_the_entry_point_checks_it(tmp_path):
    from tools.convert_to_d2 import convert
    from transfer.detection.backbones import check_stem
    from transfer.detection.convert import read_encoder_meta

    convert(_ckpt(tmp_path, _trained_like_encoder(False), False), tmp_path / "w.pkl")
    assert read_encoder_meta(tmp_path / "w.pkl")["stem_pool"] is False
    check_stem(_d2_cfg(D2_DEMO), False, "w.pkl")  # the variant config fits
    with pytest.raises(ValueError, match="STEM_POOL False"):
        check_stem(_d2_cfg(D2_SMOKE), False, "w.pkl")  # a standard stem would run at half resolution
    with pytest.raises(ValueError, match="standard stem max-pool"):
        check_stem(_d2_cfg(D2_DEMO), True, "w.pkl")
    check_stem(_d2_cfg(D2_SMOKE), None, "w.pkl")  # nothing recorded: the config is taken as it is


def test_d2_entry_point_refuses_a_stem_mismatch_before_training(tmp_path, capsys):
    from tools.convert_to_d2 import convert
    from transfer.detection.train import main
    from pretrain.data.toy_scenes import make_toy_scenes

    convert(_ckpt(tmp_path, _trained_like_encoder(False), False), tmp_path / "w.pkl")
    make_toy_scenes(tmp_path / "toy", n_train=2, n_val=1, size=32, seed=0)
    rc = main(["--config", str(D2_SMOKE), "--weights", str(tmp_path / "w.pkl"), "--data-root", str(tmp_path / "toy"),
               "--output-dir", str(tmp_path / "out")])
    assert rc == 2 and "MODEL.RESNETS.STEM_POOL False" in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_d2_meta_reader_runs_no_code(tmp_path):
    from transfer.detection.convert import read_encoder_meta

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"model": {}, "__author__": "x", "encoder": Evil()}))
    with pytest.raises(CheckpointError, match="not allowed"):
        read_encoder_meta(tmp_path / "evil.pkl")
    assert not (tmp_path / "pwned").exists()


def test_mmseg_variant_backbone_is_the_pretrained_encoder(tmp_path):
    from mmseg.registry import MODELS

    from transfer.segmentation.weights import convert, load_converted

    enc = _trained_like_encoder(stem_pool=False)
    convert(_ckpt(tmp_path, enc, False), tmp_path / "w.pth")
    state, meta = load_converted(tmp_path / "w.pth")
    assert meta["encoder"]["stem_pool"] is False
    net = MODELS.build(dict(type="ResNetStemVariant", depth=18, stem_pool=False, norm_cfg=dict(type="BN"),
                            zero_init_residual=False))
    net.load_state_dict(state, strict=True)
    net.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x)[-1], enc(x), rtol=1e-4, atol=1e-4)


def test_mmseg_entry_point_carries_the_variant(tmp_path):
    from transfer.segmentation.train import SegArgs, build_config
    from transfer.segmentation.weights import convert

    convert(_ckpt(tmp_path, _trained_like_encoder(False), False), tmp_path / "nopool.pth")
    cfg = build_config(SegArgs(config=str(SEG_DEMO), weights=str(tmp_path / "nopool.pth"), work_dir=str(tmp_path)))
    assert cfg.model.backbone.type == "ResNetStemVariant" and cfg.model.backbone.stem_pool is False
    convert(_ckpt(tmp_path, _trained_like_encoder(True), True), tmp_path / "pool.pth")
    cfg = build_config(SegArgs(config=str(SEG_DEMO), weights=str(tmp_path / "pool.pth"), work_dir=str(tmp_path)))
    assert cfg.model.backbone.type == "ResNet"  # the standard stem: nothing to carry


def test_toy_scenes_dataset_reads_the_toy_layout(tmp_path):
    from mmengine.registry import DefaultScope
    from mmseg.registry import DATASETS
    from mmseg.utils import register_all_modules

    from pretrain.data.toy_scenes import CLASS_NAMES, make_toy_scenes
    from transfer.segmentation.layout import check_dataset

    make_toy_scenes(tmp_path, n_train=3, n_val=2, size=32, seed=0)
    spec = dict(type="ToyScenesDataset", data_root=str(tmp_path),
                data_prefix=dict(img_path="val2017", seg_map_path="semantic/val2017"),
                pipeline=[dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"), dict(type="PackSegInputs")])
    assert check_dataset(spec, "val") == 2
    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope("mmseg"):
        ds = DATASETS.build(spec)
        assert len(ds) == 2 and tuple(ds.metainfo["classes"]) == CLASS_NAMES
        sample = ds[0]
    labels = sample["data_samples"].gt_sem_seg.data.unique().tolist()
    assert set(labels) <= set(range(len(CLASS_NAMES))) and 0 in labels and len(labels) > 1
