"""tools/convert_to_mmseg.py: teacher encoder -> mmseg ResNet keys, verified; refusals."""
from __future__ import annotations

import torch
import torchvision

import transfer.segmentation  # noqa: F401  (compat before mmseg)
from mmseg.models.backbones import ResNet
from pretrain.methods import ModelConfig, build_method
from tools.convert_to_mmseg import main as convert_main
from transfer.segmentation.weights import load_converted, mmseg_resnet_shapes

torch.manual_seed(0)


def _randomised_resnet18() -> dict[str, torch.Tensor]:
    """A torchvision ResNet-18 state dict (no fc) with non-default BN statistics."""
    model = torchvision.models.resnet18()
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    for k, v in sd.items():
        if k.endswith(("running_mean", "running_var")):
            sd[k] = torch.rand_like(v) + 0.5
    return sd


def test_full_checkpoint_converts_to_exact_mmseg_keys(tmp_path, capsys):
    teacher = _randomised_resnet18()
    student = {k: torch.zeros_like(v) for k, v in teacher.items()}
    model = {**{f"teacher_encoder.{k}": v for k, v in teacher.items()},
             **{f"encoder.{k}": v for k, v in student.items()},
             "prototypes.weight": torch.randn(8, 16)}
    src, out = tmp_path / "ckpt.pth", tmp_path / "mm.pth"
    torch.save({"model": model, "step": 10, "epoch": 1, "config": {"model": {"arch": "resnet18"}}}, src)

    assert convert_main([str(src), str(out)]) == 0
    summary = capsys.readouterr().out
    assert "resnet18" in summary and "11,176,512" in summary  # ResNet-18 without fc

    state, meta = load_converted(out)
    assert meta["arch"] == "resnet18" and meta["depth"] == 18
    expected = mmseg_resnet_shapes(18)
    assert set(state) == set(expected)  # every mmseg key once, nothing else
    for k, v in teacher.items():
        assert torch.equal(state[k], v), k  # the teacher's tensors, not the student's zeros
    # Strict loading into mmseg's own class, and the loaded tensors are the teacher's.
    backbone = ResNet(depth=18)
    backbone.load_state_dict(state, strict=True)
    for k, v in teacher.items():
        assert torch.equal(backbone.state_dict()[k], v), k
    # Plain tensors only: the file loads under weights_only=True.
    torch.load(out, weights_only=True)


def test_exported_backbone_and_real_method_state_dict(tmp_path):
    method = build_method(ModelConfig(arch="resnet18", num_prototypes=8, dim_hidden=32, dim_out=16))
    with torch.no_grad():  # make teacher and student differ so a wrong prefix would be caught
        for p in method.teacher_backbone().parameters():
            p.add_(1.0)
    teacher = {k: v for k, v in method.teacher_backbone().state_dict().items() if not k.endswith("num_batches_tracked")}

    full, exported = tmp_path / "full.pth", tmp_path / "export.pth"
    torch.save({"model": method.state_dict(), "step": 0}, full)
    torch.save({"backbone": method.teacher_backbone().state_dict(), "arch": "resnet18"}, exported)
    for src in (full, exported):
        out = tmp_path / (src.stem + "_mm.pth")
        assert convert_main([str(src), str(out)]) == 0
        state, _ = load_converted(out)
        assert set(state) == set(mmseg_resnet_shapes(18))
        for k, v in teacher.items():
            assert torch.equal(state[k], v), (src.name, k)


def test_refusals(tmp_path, capsys):
    good = _randomised_resnet18()
    cases = {}
    cases["no_encoder"] = {"model": {f"encoder.{k}": v for k, v in good.items()}}
    cases["missing_key"] = {"backbone": {k: v for k, v in good.items() if k != "layer3.1.conv2.weight"}, "arch": "resnet18"}
    cases["extra_key"] = {"backbone": {**good, "fc.weight": torch.zeros(10, 512)}, "arch": "resnet18"}
    cases["bad_shape"] = {"backbone": {**good, "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}, "arch": "resnet18"}
    expect = {"no_encoder": "no teacher encoder", "missing_key": "layer3.1.conv2.weight",
              "extra_key": "fc.weight", "bad_shape": "layer1.0.conv1.weight"}
    for name, obj in cases.items():
        src, out = tmp_path / f"{name}.pth", tmp_path / f"{name}_mm.pth"
        torch.save(obj, src)
        assert convert_main([str(src), str(out)]) == 2, name
        err = capsys.readouterr().err
        assert "refused" in err and expect[name] in err, (name, err)
        assert not out.exists()

    # Wrong depth: a ResNet-18 where ResNet-50 is required.
    src = tmp_path / "r18.pth"
    torch.save({"backbone": good, "arch": "resnet18"}, src)
    assert convert_main([str(src), str(tmp_path / "o.pth"), "--arch", "resnet50"]) == 2
    assert "depth mismatch" in capsys.readouterr().err

    # Unreadable file.
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    assert convert_main([str(junk), str(tmp_path / "o.pth")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert convert_main([str(tmp_path / "absent.pth"), str(tmp_path / "o.pth")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "o.pth").exists()
