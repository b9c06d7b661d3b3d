"""The official SlotCon release layout and plain torchvision state dicts: both converters take the
teacher ``encoder_k`` (never ``encoder_q``), the evaluation tools rebuild the full official teacher,
and a pickle naming any global besides ``argparse.Namespace`` is refused without running."""
from __future__ import annotations

import argparse
import json
import os
import pickle
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import transfer.segmentation  # noqa: F401  (compat before mmseg)
from pretrain.data.toy_scenes import make_toy_scenes
from pretrain.eval.__main__ import cli as eval_cli
from pretrain.eval.inference import CheckpointRefused, load_method
from tests.data_helpers import run_visualize_slots
from tools.convert_to_d2 import main as d2_main
from tools.convert_to_mmseg import main as mmseg_main
from transfer.checkpoint_io import CheckpointError, load_teacher_encoder
from transfer.detection.convert import rename_key

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)

K, HIDDEN, OUT = 8, 32, 16


def _random_resnet(arch: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """torchvision key names and shapes (no fc, with num_batches_tracked), every value drawn from ``gen``."""
    with torch.device("meta"):
        shapes = {k: v for k, v in getattr(torchvision.models, arch)().state_dict().items() if not k.startswith("fc.")}
    out = {}
    for k, v in shapes.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(1234)
        elif k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=gen) + 0.5
        else:
            out[k] = 0.05 * torch.randn(v.shape, generator=gen)
    return out


def _head(dim_in: int, conv: bool, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The official 3-layer head, written from its description: (linear, BN, GELU) x 2, linear.

    Linear layers sit at Sequential indices 0, 3, 6 and BNs at 1, 4; ``conv`` gives 1x1 conv weights.
    """
    sd: dict[str, torch.Tensor] = {}
    dims = [(0, dim_in, HIDDEN), (3, HIDDEN, HIDDEN), (6, HIDDEN, OUT)]
    for idx, i, o in dims:
        sd[f"mlp.{idx}.weight"] = torch.randn((o, i, 1, 1) if conv else (o, i), generator=gen) * 0.1
        sd[f"mlp.{idx}.bias"] = torch.randn(o, generator=gen) * 0.1
        if idx < 6:
            b = idx + 1
            sd[f"mlp.{b}.weight"] = torch.rand(o, generator=gen) + 0.5
            sd[f"mlp.{b}.bias"] = torch.randn(o, generator=gen) * 0.1
            sd[f"mlp.{b}.running_mean"] = torch.randn(o, generator=gen) * 0.1
            sd[f"mlp.{b}.running_var"] = torch.rand(o, generator=gen) + 0.5
            sd[f"mlp.{b}.num_batches_tracked"] = torch.tensor(1234)
    return sd


def official_checkpoint(arch: str = "resnet18", seed: int = 0) -> dict:
    """A checkpoint in the layout the authors' main_pretrain.py saves, every tensor distinct."""
    gen = torch.Generator().manual_seed(seed)
    feats = 512 if arch in ("resnet18", "resnet34") else 2048
    model: dict[str, torch.Tensor] = {}
    for side in ("q", "k"):  # drawn separately: the student and the teacher differ everywhere
        model.update({f"encoder_{side}.{k}": v for k, v in _random_resnet(arch, gen).items()})
        model.update({f"projector_{side}.{k}": v for k, v in _head(feats, True, gen).items()})
        model[f"grouping_{side}.slot_embed.weight"] = torch.randn(K, OUT, generator=gen)
    model.update({f"predictor_slot.{k}": v for k, v in _head(OUT, False, gen).items()})
    model["center"] = torch.randn(1, K, generator=gen) * 0.1
    args = argparse.Namespace(
        dataset="COCO", data_dir="./data", image_size=224, min_scale=0.08, arch=arch, dim_hidden=HIDDEN,
        dim_out=OUT, num_prototypes=K, teacher_momentum=0.99, teacher_temp=0.07, student_temp=0.1,
        center_momentum=0.9, group_loss_weight=0.5, batch_size=64, base_lr=1.0, optimizer="lars",
        warmup_epoch=5, warmup_multiplier=100, weight_decay=1e-5, momentum=0.9, fp16=True, start_epoch=1,
        epochs=800, output_dir="./output", auto_resume=True, resume="", print_freq=10, save_freq=50, seed=None,
        num_workers=8, local_rank=0, world_size=8, num_instances=118287,
    )
    return {
        "args": args,
        "model": {f"module.{k}": v for k, v in model.items()},
        "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                      "param_groups": [{"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-5, "params": [0]}]},
        "scheduler": {"last_epoch": 7, "base_lrs": [8.0], "_step_count": 8},
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                   "_growth_tracker": 11},
        "epoch": 800,
    }


def _side(ckpt: dict, prefix: str) -> dict[str, torch.Tensor]:
    p = f"module.{prefix}"
    return {k[len(p):]: v for k, v in ckpt["model"].items() if k.startswith(p)}


def _weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("official") / "slotcon_coco_r18_800ep.pth"
    ckpt = official_checkpoint()
    torch.save(ckpt, path)
    return path, ckpt


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_scenes(tmp_path_factory.mktemp("toy") / "toy", n_train=1, n_val=3, size=64, seed=0)


def _check_d2(pkl: Path, teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor]) -> None:
    with open(pkl, "rb") as f:
        model = pickle.load(f)["model"]
    teacher = _weights(teacher)
    assert len(model) == len(teacher)
    for k, v in teacher.items():
        np.testing.assert_array_equal(model[rename_key(k)], v.numpy(), err_msg=k)
        assert not np.array_equal(model[rename_key(k)], student[k].numpy()), k


def _check_mmseg(pth: Path, teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor]) -> None:
    sd = torch.load(pth, weights_only=True)["state_dict"]
    for k, v in _weights(teacher).items():
        assert torch.equal(sd[k], v), k
        assert not torch.equal(sd[k], student[k]), k


def test_converters_take_encoder_k(official, tmp_path):
    path, ckpt = official
    teacher, student = _side(ckpt, "encoder_k."), _side(ckpt, "encoder_q.")
    assert d2_main([str(path), str(tmp_path / "b.pkl")]) == 0
    _check_d2(tmp_path / "b.pkl", teacher, student)
    assert mmseg_main([str(path), str(tmp_path / "b.pth"), "--arch", "resnet18"]) == 0
    _check_mmseg(tmp_path / "b.pth", teacher, student)


def test_resnet50_official_converts_exactly(tmp_path):
    ckpt = official_checkpoint("resnet50", seed=1)
    path = tmp_path / "slotcon_coco_r50_800ep.pth"
    torch.save(ckpt, path)
    teacher, student = _side(ckpt, "encoder_k."), _side(ckpt, "encoder_q.")
    assert d2_main([str(path), str(tmp_path / "r50.pkl"), "--depth", "50"]) == 0
    _check_d2(tmp_path / "r50.pkl", teacher, student)
    assert mmseg_main([str(path), str(tmp_path / "r50.pth")]) == 0
    _check_mmseg(tmp_path / "r50.pth", teacher, student)


def _save_variant(tmp_path: Path, name: str, ckpt: dict, drop=(), **args) -> Path:
    variant = dict(ckpt, model={k: v for k, v in ckpt["model"].items() if not any(k.startswith(d) for d in drop)},
                   args=argparse.Namespace(**{**vars(ckpt["args"]), **args}))
    path = tmp_path / f"{name}.pth"
    torch.save(variant, path)
    return path


def test_refusals(official, tmp_path, capsys):
    _, ckpt = official
    no_k = _save_variant(tmp_path, "no_k", ckpt, drop=("module.encoder_k.",))
    for argv in ([str(no_k), str(tmp_path / "o.pkl")], [str(no_k), str(tmp_path / "o.pth")]):
        assert (d2_main if argv[1].endswith(".pkl") else mmseg_main)(argv) == 2
        err = capsys.readouterr().err
        assert "refused" in err and "encoder_k" in err and "encoder_q" in err, err
    with pytest.raises(CheckpointError, match="encoder_k"):
        load_method(no_k, torch.device("cpu"))

    partial = dict(ckpt, model=dict(ckpt["model"]))
    del partial["model"]["module.encoder_k.layer3.1.bn2.running_var"]
    torch.save(partial, tmp_path / "partial.pth")
    assert d2_main([str(tmp_path / "partial.pth"), str(tmp_path / "o.pkl")]) == 2
    assert "layer3.1.bn2.running_var" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="layer3.1.bn2.running_var"):
        load_method(tmp_path / "partial.pth", torch.device("cpu"))

    assert mmseg_main([str(official[0]), str(tmp_path / "o.pth"), "--arch", "resnet50"]) == 2
    assert "depth mismatch" in capsys.readouterr().err
    declared = _save_variant(tmp_path, "declared", ckpt, arch="resnet34")
    assert d2_main([str(declared), str(tmp_path / "o.pkl")]) == 2
    assert "declares arch 'resnet34'" in capsys.readouterr().err
    assert not (tmp_path / "o.pkl").exists() and not (tmp_path / "o.pth").exists()

    no_args = dict(ckpt)
    del no_args["args"]
    torch.save(no_args, tmp_path / "no_args.pth")
    with pytest.raises(CheckpointRefused, match="without 'args'"):
        load_method(tmp_path / "no_args.pth", torch.device("cpu"))
    no_pred = _save_variant(tmp_path, "no_pred", ckpt, drop=("module.predictor_slot.",))
    with pytest.raises(CheckpointRefused, match=r"missing \(would stay random\).*predictor"):
        load_method(no_pred, torch.device("cpu"))


# runpy warns that pretrain.eval.__main__ is already imported (by this file): harmless here.
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_eval_builds_the_official_teacher(official, toy, tmp_path, monkeypatch, capsys):
    path, ckpt = official
    method, cfg = load_method(path, torch.device("cpu"))
    assert cfg["model"]["arch"] == "resnet18" and cfg["model"]["tau_t"] == 0.07 and cfg["model"]["tau_s"] == 0.1
    assert cfg["model"]["lambda_g"] == 0.5 and cfg["model"]["num_prototypes"] == K and cfg["model"]["stem_pool"]
    assert cfg["epoch"] == 800
    pairs = [(method.teacher_encoder, "encoder_k."), (method.encoder, "encoder_q."),
             (method.teacher_projector, "projector_k."), (method.projector, "projector_q."),
             (method.predictor, "predictor_slot.")]
    for module, prefix in pairs:
        theirs = _side(ckpt, prefix)
        ours = module.state_dict()
        assert ours.keys() == theirs.keys(), prefix
        for k, v in ours.items():
            assert torch.equal(v, theirs[k]), prefix + k
    assert torch.equal(method.teacher_prototypes.weight, ckpt["model"]["module.grouping_k.slot_embed.weight"])
    assert torch.equal(method.prototypes.weight, ckpt["model"]["module.grouping_q.slot_embed.weight"])
    assert torch.equal(method.center, ckpt["model"]["module.center"].reshape(-1))
    a = method.assign(torch.randn(1, 3, 64, 64))
    assert a.shape == (1, K, 2, 2)  # torchvision ResNet: stride 32

    # the real command line, in this process (python -m pretrain.eval ...)
    out = tmp_path / "unsup.json"
    monkeypatch.setattr(sys, "argv", ["pretrain.eval", "unsup_seg", str(path), str(toy), "--compare-random",
                                      "--no-progress", "--device", "cpu", "--out", str(out)])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("pretrain.eval", run_name="__main__", alter_sys=True)
    assert exc.value.code == 0
    res = json.loads(out.read_text())
    assert res["checkpoint"] == str(path) and res["model"]["arch"] == "resnet18"
    for name in ("pretrained", "random_init"):
        assert res[name]["num_prototypes"] == K
    # the CLI evaluated the teacher it loaded: its figures are the library's on that teacher and split
    from pretrain.eval.datasets import ToySemantic
    from pretrain.eval.unsup_seg import evaluate_unsup_seg

    direct = evaluate_unsup_seg(method.eval(), ToySemantic(toy, "val2017", None), device=torch.device("cpu"),
                                progress=False)
    assert res["pretrained"]["miou"] == pytest.approx(direct["miou"], abs=1e-9)
    assert res["pretrained"]["pacc"] == pytest.approx(direct["pacc"], abs=1e-9)

    imgs = sorted((toy / "val2017").glob("*.jpg"))[:1]
    assert run_visualize_slots(path, imgs, tmp_path / "viz", monkeypatch) == [f"{imgs[0].stem}_slots.png"]


def test_eval_tools_refuse_with_exit_2(official, toy, tmp_path, monkeypatch, capsys):
    _, ckpt = official
    no_k = _save_variant(tmp_path, "no_k", ckpt, drop=("module.encoder_k.",))
    assert eval_cli(["unsup_seg", str(no_k), str(toy), "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("refused: ") and err.count("\n") == 1 and "encoder_k" in err
    img = sorted((toy / "val2017").glob("*.jpg"))[0]
    argv = [str(ROOT / "tools/visualize_slots.py"), str(no_k), str(img), "--out", str(tmp_path / "v")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(argv[0], run_name="__main__")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("refused: ") and err.count("\n") == 1 and "Traceback" not in err


def test_torchvision_state_dict_converts(tmp_path):
    tv = torchvision.models.resnet18()
    torch.nn.init.normal_(tv.layer4[1].bn2.running_mean)
    sd = tv.state_dict()
    assert "fc.weight" in sd
    torch.save(sd, tmp_path / "tv.pth")
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "tv_ddp.pth")
    for name in ("tv", "tv_ddp"):
        state, arch = load_teacher_encoder(tmp_path / f"{name}.pth")
        assert arch == "resnet18" and not any(k.startswith("fc.") for k in state)
        assert d2_main([str(tmp_path / f"{name}.pth"), str(tmp_path / f"{name}.pkl")]) == 0
        _check_d2(tmp_path / f"{name}.pkl", {k: v for k, v in sd.items() if not k.startswith("fc.")},
                  {k: v + 1.0 for k, v in sd.items()})
    assert mmseg_main([str(tmp_path / "tv.pth"), str(tmp_path / "tv_mm.pth")]) == 0


class _RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint would do under plain pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_with_another_global_is_refused_and_not_run(official, toy, tmp_path, monkeypatch, capsys):
    _, ckpt = official
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    torch.save(dict(ckpt, args=_RunsCode(marker)), evil)
    assert d2_main([str(evil), str(tmp_path / "o.pkl")]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert mmseg_main([str(evil), str(tmp_path / "o.pth")]) == 2
    assert "posix.system" in capsys.readouterr().err
    assert eval_cli(["unsup_seg", str(evil), str(toy), "--no-progress", "--device", "cpu"]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    with pytest.raises(CheckpointRefused):
        load_method(evil, torch.device("cpu"))
    assert not marker.exists()
