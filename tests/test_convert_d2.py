"""tools/convert_to_d2.py and transfer/checkpoint_io.py: renaming, verification, refusals, strict loading."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import transfer.detection.compat  # noqa: F401
from pretrain.methods import ModelConfig, build_method
from tools.convert_to_d2 import convert, main as convert_main
from transfer.checkpoint_io import CheckpointError, expected_resnet_shapes, load_teacher_encoder
from transfer.detection.convert import expected_d2_shapes, rename_key

REPO = Path(__file__).resolve().parents[1]
SMOKE_CFG = REPO / "configs/detection/mask_rcnn_FPN_smoke_cpu.yaml"


def make_method_checkpoint(path: Path, arch: str = "resnet18") -> dict[str, torch.Tensor]:
    """Save a real method's state dict in the contract's checkpoint format; return its teacher encoder.

    The teacher is shifted away from the student so that a converter reading the wrong encoder fails.
    """
    torch.manual_seed(0)
    method = build_method(ModelConfig(arch=arch, num_prototypes=8, dim_hidden=32, dim_out=16))
    state = method.state_dict()
    for k, v in state.items():
        if k.startswith("teacher_encoder.") and v.is_floating_point():
            state[k] = v + 0.25 + 0.01 * torch.randn_like(v)
    torch.save({"model": state, "optimizer": {}, "step": 5, "epoch": 1, "step_in_epoch": 0,
                "config": {"model": {"arch": arch}}}, path)
    return {k[len("teacher_encoder."):]: v for k, v in state.items()
            if k.startswith("teacher_encoder.") and not k.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def method_ckpt(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    return path, make_method_checkpoint(path)


def test_rename_key_examples():
    assert rename_key("conv1.weight") == "stem.conv1.weight"
    assert rename_key("bn1.running_var") == "stem.conv1.norm.running_var"
    assert rename_key("layer1.2.conv3.weight") == "res2.2.conv3.weight"
    assert rename_key("layer3.0.bn2.bias") == "res4.0.conv2.norm.bias"
    assert rename_key("layer4.0.downsample.0.weight") == "res5.0.shortcut.weight"
    assert rename_key("layer2.0.downsample.1.running_mean") == "res3.0.shortcut.norm.running_mean"
    with pytest.raises(CheckpointError, match="fc.weight"):
        rename_key("fc.weight")


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_renamed_torchvision_equals_detectron2_resnet(arch):
    # Detectron2's own builder vs torchvision's resnet through rename_key: same keys, same shapes.
    renamed = {rename_key(k): s for k, s in expected_resnet_shapes(arch).items()}
    d2 = expected_d2_shapes(arch)
    assert renamed == d2
    assert len(d2) == {"resnet18": 100, "resnet34": 180, "resnet50": 265, "resnet101": 520}[arch]


def test_convert_method_checkpoint_takes_teacher(method_ckpt, tmp_path):
    ckpt, teacher = method_ckpt
    out = tmp_path / "r18.pkl"
    text = convert(ckpt, out)
    data = pickle.load(open(out, "rb"), encoding="latin1")
    assert data["matching_heuristics"] is True and isinstance(data["__author__"], str)
    model = data["model"]
    assert set(model) == set(expected_d2_shapes("resnet18"))
    assert len(model) == len(teacher) == 100
    for k, v in teacher.items():
        arr = model[rename_key(k)]
        assert isinstance(arr, np.ndarray) and arr.dtype == np.float32
        np.testing.assert_array_equal(arr, v.numpy())
    assert "resnet18 / 18" in text and "tensors    : 100" in text and "checksum" in text


def test_exported_backbone_gives_same_weights(method_ckpt, tmp_path):
    ckpt, teacher = method_ckpt
    exported = tmp_path / "backbone.pth"
    torch.save({"backbone": teacher, "arch": "resnet18"}, exported)
    def checksum_line(report: str) -> str:
        return next(line for line in report.splitlines() if line.startswith("checksum"))

    assert checksum_line(convert(ckpt, tmp_path / "a.pkl")) == checksum_line(convert(exported, tmp_path / "b.pkl"))


def test_torchvision_resnet50_roundtrip(tmp_path):
    tv = torchvision.models.resnet50()
    torch.nn.init.normal_(tv.layer4[2].bn3.running_mean)
    sd = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    torch.save({"backbone": sd, "arch": "resnet50"}, tmp_path / "r50.pth")
    assert convert_main([str(tmp_path / "r50.pth"), str(tmp_path / "r50.pkl"), "--depth", "50"]) == 0
    model = pickle.load(open(tmp_path / "r50.pkl", "rb"))["model"]
    assert len(model) == 265
    np.testing.assert_array_equal(model["res5.2.conv3.norm.running_mean"], tv.layer4[2].bn3.running_mean.numpy())


def _refusal(capsys, argv: list[str]) -> str:
    assert convert_main(argv) == 2
    return capsys.readouterr().err


def test_refusals(method_ckpt, tmp_path, capsys):
    ckpt, teacher = method_ckpt
    out = str(tmp_path / "o.pkl")
    err = _refusal(capsys, [str(ckpt), out, "--depth", "50"])
    assert "depth mismatch" in err and "resnet50" in err and "resnet18" in err

    err = _refusal(capsys, [str(tmp_path / "nope.pth"), out])
    assert "checkpoint not found" in err and "nope.pth" in err

    (tmp_path / "garbage.pth").write_bytes(b"this is not a checkpoint")
    err = _refusal(capsys, [str(tmp_path / "garbage.pth"), out])
    assert "cannot read checkpoint" in err and "garbage.pth" in err

    torch.save({"model": {"encoder.conv1.weight": torch.zeros(1)}, "step": 0}, tmp_path / "noenc.pth")
    err = _refusal(capsys, [str(tmp_path / "noenc.pth"), out])
    assert "no teacher encoder" in err and "encoder" in err

    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    assert "no encoder in the checkpoint" in _refusal(capsys, [str(tmp_path / "other.pth"), out])

    broken = dict(teacher)
    del broken["layer3.1.bn2.running_var"]
    torch.save({"backbone": broken, "arch": "resnet18"}, tmp_path / "broken.pth")
    err = _refusal(capsys, [str(tmp_path / "broken.pth"), out])
    assert "1 missing" in err and "layer3.1.bn2.running_var" in err

    extra = dict(teacher, **{"fc.weight": torch.zeros(10, 512)})
    torch.save({"backbone": extra, "arch": "resnet18"}, tmp_path / "extra.pth")
    assert "unexpected" in _refusal(capsys, [str(tmp_path / "extra.pth"), out])

    torch.save({"backbone": teacher, "arch": "resnet34"}, tmp_path / "declared.pth")
    assert "declares arch 'resnet34'" in _refusal(capsys, [str(tmp_path / "declared.pth"), out])

    assert "must end in .pkl" in _refusal(capsys, [str(ckpt), str(tmp_path / "o.pth")])
    assert not Path(out).exists()  # nothing written by any refusal


def test_load_teacher_encoder_api(method_ckpt):
    ckpt, teacher = method_ckpt
    state, arch = load_teacher_encoder(ckpt)
    assert arch == "resnet18" and set(state) == set(teacher)
    assert all(torch.equal(state[k], teacher[k]) for k in teacher)
    with pytest.raises(CheckpointError, match="depth mismatch"):
        load_teacher_encoder(ckpt, "resnet50")


def _d2_model(depth: int):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(str(SMOKE_CFG))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    return build_model(cfg)


def test_detectron2_loads_all_backbone_keys(method_ckpt, tmp_path):
    from transfer.detection.train import BackboneWeightsError, StrictBackboneCheckpointer

    ckpt, teacher = method_ckpt
    pkl = tmp_path / "r18.pkl"
    convert(ckpt, pkl)
    model = _d2_model(18)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpointer = StrictBackboneCheckpointer(model)
    checkpointer.load(str(pkl))
    bottom_up = {k: v for k, v in model.backbone.bottom_up.state_dict().items()
                 if not k.endswith("num_batches_tracked")}
    assert len(checkpointer.loaded_backbone_keys) == len(bottom_up) == 100
    for k, v in teacher.items():
        torch.testing.assert_close(bottom_up[rename_key(k)], v, rtol=0, atol=0)
    # the FPN is not part of the checkpoint: it keeps its initialisation
    assert torch.equal(model.state_dict()["backbone.fpn_lateral2.weight"], before["backbone.fpn_lateral2.weight"])

    # a backbone tensor missing from the file stops the load
    data = pickle.load(open(pkl, "rb"))
    del data["model"]["res4.1.conv2.weight"]
    pickle.dump(data, open(tmp_path / "holed.pkl", "wb"))
    with pytest.raises(BackboneWeightsError, match="res4.1.conv2.weight"):
        StrictBackboneCheckpointer(_d2_model(18)).load(str(tmp_path / "holed.pkl"))

    # ResNet-18 weights into a ResNet-50 detector: refused, naming the depth setting
    with pytest.raises(BackboneWeightsError, match="MODEL.RESNETS.DEPTH"):
        StrictBackboneCheckpointer(_d2_model(50)).load(str(pkl))


def test_protocol_config_loads_resnet50_exactly(tmp_path):
    """The published-protocol config (R50-FPN, 4conv1fc, SyncBN->BN on CPU) takes every converted tensor."""
    from detectron2.modeling import build_model

    from transfer.detection.train import StrictBackboneCheckpointer, build_parser, setup_cfg

    torch.manual_seed(1)
    tv = torchvision.models.resnet50()
    for m in tv.modules():  # non-trivial BN statistics so a swapped key would be noticed
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    sd = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    torch.save({"backbone": sd, "arch": "resnet50"}, tmp_path / "r50.pth")
    convert(tmp_path / "r50.pth", tmp_path / "r50.pkl")
    args = build_parser().parse_args(["--config", str(REPO / "configs/detection/mask_rcnn_R50_FPN_1x_syncbn.yaml"),
                                      "--weights", str(tmp_path / "r50.pkl"), "MODEL.DEVICE", "cpu"])
    cfg = setup_cfg(args)
    model = build_model(cfg)
    ck = StrictBackboneCheckpointer(model)
    ck.load(cfg.MODEL.WEIGHTS)
    assert len(ck.loaded_backbone_keys) == 265
    got = model.backbone.bottom_up.state_dict()
    for k, v in sd.items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(got[rename_key(k)], v), k
    # stride in the 3x3 conv, as in torchvision (STRIDE_IN_1X1 False)
    assert model.backbone.bottom_up.res3[0].conv2.stride == (2, 2)
    assert model.backbone.bottom_up.res3[0].conv1.stride == (1, 1)
