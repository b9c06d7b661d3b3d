"""No input file runs code, and unusable weights are refused with one line and exit status 2.

Every entry point that reads a file (``python -m transfer.detection`` with ``--weights``, ``--resume`` and
``--eval-only``; ``python -m transfer.segmentation`` likewise; ``python -m pretrain.eval``;
``tools/visualize_slots.py``) is handed a pickle whose unpickling would create a marker file, plus
truncated, mis-keyed and non-finite files. The marker must never appear, and a legitimate Detectron2
resume (a checkpoint Detectron2 wrote itself) must still load.
"""
from __future__ import annotations

import builtins
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import transfer.detection.compat  # noqa: F401  (before Detectron2)
import transfer.segmentation  # noqa: F401  (compat before mmseg)
from pretrain.config import load_config, to_dict
from pretrain.data.toy_scenes import make_toy_scenes
from pretrain.eval.__main__ import cli as eval_cli
from pretrain.methods import build_method
from tests.test_convert_d2 import make_method_checkpoint
from tools.convert_to_d2 import main as d2_convert
from tools.visualize_slots import main as visualize_main
from transfer.checkpoint_io import CheckpointError, read_plain_pickle
from transfer.detection.convert import write_d2_pickle

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs/detection/mask_rcnn_FPN_smoke_cpu.yaml"
VOC_SMOKE = REPO / "configs/segmentation/fcn_d6_r50-d16_voc12aug_smoke.py"
TINY = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "64"]
# One iteration, no evaluation hooks between: the cheapest run that writes a real Detectron2 checkpoint.
ONE_ITER = ["SOLVER.MAX_ITER", "1", "SOLVER.STEPS", "(5,)", "TEST.PRECISE_BN.ENABLED", "False", *TINY]
torch.set_num_threads(1)


class RunsCode:
    """Unpickling this calls ``fn(*args)``: what a crafted weights file does under plain pickle."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def hostile(marker: Path, how: str) -> RunsCode:
    """An object whose unpickling creates ``marker``: through a shell (``os.system``) or ``open``."""
    return RunsCode(os.system, f"touch {marker}") if how == "system" else RunsCode(builtins.open, str(marker), "w")


def write_hostile(path: Path, marker: Path, how: str, *, torch_format: bool) -> Path:
    """A file that looks like weights (``model`` + ``__author__``) and runs code when unpickled plainly."""
    record = {"model": {"w": np.zeros(3, np.float32)}, "__author__": "x", "payload": hostile(marker, how)}
    if torch_format:
        torch.save(record, path)
    else:
        path.write_bytes(pickle.dumps(record))
    return path


def one_error_line(err: str) -> str:
    # A logging handler of a third-party logger writing to an already-closed stream at interpreter exit
    # prints a "--- Logging error ---" block (logging.Handler.handleError); it is not the entry point's output.
    if "--- Logging error ---" in err:
        err = "\n".join(ln for ln in err.splitlines() if ln.startswith("python -m "))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_scenes(tmp_path_factory.mktemp("toy") / "toy", n_train=4, n_val=2, size=64, seed=0)


# ----------------------------------------------------------------------------- the restricted unpickler

@pytest.mark.parametrize("how", ["system", "open"])
def test_plain_pickle_reader_refuses_code_and_reads_arrays(tmp_path, how):
    marker = tmp_path / "ran"
    evil = write_hostile(tmp_path / "evil.pkl", marker, how, torch_format=False)
    with pytest.raises(CheckpointError, match="not allowed in a weights file"):
        read_plain_pickle(evil)
    assert not marker.exists()
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float64(2.5)}
    write_d2_pickle(arrays, tmp_path / "ok.pkl", encoder={"stem_pool": False})
    back = read_plain_pickle(tmp_path / "ok.pkl")
    np.testing.assert_array_equal(back["model"]["a"], arrays["a"])
    assert back["model"]["b"] == 2.5 and back["encoder"] == {"stem_pool": False}
    (tmp_path / "cut.pkl").write_bytes((tmp_path / "ok.pkl").read_bytes()[:40])
    with pytest.raises(CheckpointError, match="cut.pkl"):
        read_plain_pickle(tmp_path / "cut.pkl")


# ----------------------------------------------------------------------------- transfer.detection

@pytest.mark.parametrize("how,suffix", [("system", ".pkl"), ("open", ".pkl"), ("system", ".pth")])
def test_detection_weights_that_run_code_are_refused(toy, tmp_path, capsys, how, suffix):
    from transfer.detection.train import main

    marker = tmp_path / "ran"
    evil = write_hostile(tmp_path / f"evil{suffix}", marker, how, torch_format=suffix == ".pth")
    for extra in ([], ["--eval-only"]):
        rc = main(["--config", str(SMOKE), "--weights", str(evil), "--data-root", str(toy),
                   "--output-dir", str(tmp_path / "out"), *extra, *TINY])
        line = one_error_line(capsys.readouterr().err)
        assert rc == 2 and str(evil) in line and "nothing in it was run" in line, line
    assert not marker.exists()
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_detection_checkpointer_reads_without_plain_pickle(tmp_path, r18_pkl, monkeypatch):
    """What every rank's checkpointer (and so Detectron2's own load path) reads: never plain pickle."""
    from transfer.detection.train import StrictBackboneCheckpointer

    marker = tmp_path / "ran"
    ck = StrictBackboneCheckpointer(torch.nn.Linear(1, 1))
    for path in (write_hostile(tmp_path / "evil.pkl", marker, "system", torch_format=False),
                 write_hostile(tmp_path / "evil.pth", marker, "open", torch_format=True)):
        with pytest.raises(CheckpointError, match="nothing in it was run"):
            ck._load_file(str(path))
    assert not marker.exists()

    def no_plain_pickle(*args, **kwargs):
        raise AssertionError("plain pickle.load was called")

    monkeypatch.setattr(pickle, "load", no_plain_pickle)
    record = ck._load_file(str(r18_pkl))
    assert record["__author__"].startswith("objcentric") and record["matching_heuristics"] is True
    assert "res4.0.conv1.weight" in record["model"]


def test_detection_resume_refuses_code_and_resumes_a_real_checkpoint(toy, r18_pkl, tmp_path, capsys):
    from transfer.detection.train import main

    common = ["--config", str(SMOKE), "--weights", str(r18_pkl), "--data-root", str(toy)]
    out = tmp_path / "run"
    assert main([*common, "--output-dir", str(out), *ONE_ITER]) == 0
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    # the checkpoint Detectron2 wrote (model, iteration, trainer/scheduler state) loads with weights_only
    saved = torch.load(out / "model_final.pth", weights_only=True)
    assert saved["iteration"] == 0 and "model" in saved

    # a requeued job continues from it: iteration 1 follows iteration 0, once each
    assert main([*common, "--output-dir", str(out), "--resume", *ONE_ITER[:1], "2", *ONE_ITER[2:]]) == 0
    iters = [r["iteration"] for r in map(json.loads, (out / "train_metrics.json").read_text().splitlines())
             if "total_loss" in r]
    assert iters == [0, 1], iters
    assert torch.load(out / "model_final.pth", weights_only=True)["iteration"] == 1
    # and the trained detector it wrote evaluates (--eval-only loads every model key through the same reader)
    assert main([*common[:2], "--weights", str(out / "model_final.pth"), *common[4:], "--output-dir",
                 str(tmp_path / "eval"), "--eval-only", *TINY]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["eval_only"] is True

    # the checkpoint --resume would continue replaced by one that runs code: refused before any rank starts
    marker = tmp_path / "ran"
    write_hostile(out / "model_final.pth", marker, "system", torch_format=True)
    capsys.readouterr()  # the training runs' own log lines
    rc = main([*common, "--output-dir", str(out), "--resume", *ONE_ITER])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "model_final.pth" in line and "posix.system" in line, line
    (out / "last_checkpoint").write_text("model_9.pth")
    assert main([*common, "--output-dir", str(out), "--resume", *ONE_ITER]) == 2
    assert "model_9.pth" in one_error_line(capsys.readouterr().err)
    assert not marker.exists()


def test_detection_refuses_non_finite_weights(toy, r18_pkl, tmp_path, capsys):
    from transfer.detection.train import main

    record = read_plain_pickle(r18_pkl)
    arrays = dict(record["model"])
    arrays["res4.1.conv2.weight"] = arrays["res4.1.conv2.weight"].copy()
    arrays["res4.1.conv2.weight"][0, 0, 0, 0] = np.nan
    write_d2_pickle(arrays, tmp_path / "nan.pkl")
    rc = main(["--config", str(SMOKE), "--weights", str(tmp_path / "nan.pkl"), "--data-root", str(toy),
               "--output-dir", str(tmp_path / "out"), *TINY])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "nan.pkl" in line and "res4.1.conv2.weight (1 of" in line and "NaN" in line, line


# ----------------------------------------------------------------------------- transfer.segmentation

@pytest.fixture(scope="module")
def seg(tmp_path_factory) -> tuple[Path, Path]:
    """Converted ResNet-18 weights and a tiny VOC layout."""
    from transfer.segmentation.toy_layouts import make_voc
    from transfer.segmentation.weights import convert

    d = tmp_path_factory.mktemp("seg")
    teacher = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    torch.save({"backbone": teacher, "arch": "resnet18"}, d / "bb.pth")
    convert(d / "bb.pth", d / "r18_mm.pth")
    make_voc(d / "data", n_train=2, n_aug=1, n_val=1)
    return d / "r18_mm.pth", d / "data" / "VOCdevkit" / "VOC2012"


def _seg_argv(weights: Path | str, root: Path, work: Path, *extra: str) -> list[str]:
    return ["--config", str(VOC_SMOKE), "--weights", str(weights), "--data-root", str(root), "--work-dir", str(work),
            *extra, "model.backbone.depth=18", "model.decode_head.in_channels=512"]


@pytest.mark.parametrize("how", ["system", "open"])
def test_segmentation_files_that_run_code_are_refused(seg, tmp_path, capsys, how):
    from transfer.segmentation.train import main

    weights, root = seg
    marker = tmp_path / "ran"
    evil = write_hostile(tmp_path / "evil.pth", marker, how, torch_format=True)
    work = tmp_path / "work"
    # as the backbone weights
    assert main(_seg_argv(evil, root, work)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(evil) in line and "nothing in it was run" in line, line
    # as the fine-tuned checkpoint --eval-only evaluates
    assert main(_seg_argv(weights, root, work, "--eval-only", "--checkpoint", str(evil))) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--eval-only" in line and str(evil) in line, line
    # as the checkpoint --resume continues
    work.mkdir()
    (work / "last_checkpoint").write_text(str(evil))
    assert main(_seg_argv(weights, root, work, "--resume")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--resume" in line and str(evil) in line, line
    assert not marker.exists() and not (work / "metrics.json").exists()


def test_mmengine_loader_reads_weights_only(seg, tmp_path):
    """mmengine's own checkpoint loading (Pretrained init, load_from, resume on every rank) goes through
    the project's reader, whatever torch.load's default is."""
    from mmengine.runner.checkpoint import CheckpointLoader, _load_checkpoint

    weights, _ = seg
    marker = tmp_path / "ran"
    evil = write_hostile(tmp_path / "evil.pth", marker, "system", torch_format=True)
    assert CheckpointLoader._get_checkpoint_loader(str(evil)).__name__ == "load_from_local_weights_only"
    with pytest.raises(CheckpointError, match="nothing in it was run"):
        _load_checkpoint(str(evil), map_location="cpu")
    assert not marker.exists()
    assert set(_load_checkpoint(str(weights), map_location="cpu")) == {"state_dict", "meta"}


def test_segmentation_refuses_non_finite_weights(seg, tmp_path, capsys):
    from transfer.segmentation.train import main
    from transfer.segmentation.weights import load_converted

    weights, root = seg
    state, meta = load_converted(weights)
    state = dict(state, **{"layer3.0.conv1.weight": state["layer3.0.conv1.weight"].clone()})
    state["layer3.0.conv1.weight"][1, 2, 0, 0] = float("inf")
    torch.save({"state_dict": state, "meta": meta}, tmp_path / "inf.pth")
    assert main(_seg_argv(tmp_path / "inf.pth", root, tmp_path / "work")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "inf.pth" in line and "layer3.0.conv1.weight (1 of" in line, line


# ----------------------------------------------------------------------------- converters

@pytest.mark.parametrize("tool", ["d2", "mmseg"])
def test_converters_refuse_non_finite_weights(tmp_path, capsys, tool):
    from tools.convert_to_mmseg import main as mmseg_convert

    teacher = make_method_checkpoint(tmp_path / "ok.pth", "resnet18")
    ckpt = torch.load(tmp_path / "ok.pth", weights_only=True)
    ckpt["model"]["teacher_encoder.layer3.1.conv1.weight"][0, 0, 1, 1] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pth")
    out = tmp_path / ("o.pkl" if tool == "d2" else "o.pth")
    rc = (d2_convert if tool == "d2" else mmseg_convert)([str(tmp_path / "nan.pth"), str(out)])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "layer3.1.conv1.weight (1 of" in line and "non-finite" in line, line
    assert not out.exists() and teacher


# ----------------------------------------------------------------------------- pretrain.eval, visualize_slots

@pytest.fixture(scope="module")
def run_ckpt(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny SlotCon training checkpoint (real config dict) and toy scenes to evaluate on."""
    d = tmp_path_factory.mktemp("eval")
    toy = make_toy_scenes(d / "toy", n_train=1, n_val=2, size=64, seed=0)
    cfg = load_config(REPO / "configs/pretrain/demo_cpu.yaml",
                      ["model.num_prototypes=8", "model.dim_hidden=32", "model.dim_out=16"])
    method = build_method(cfg.model)
    ckpt = {"model": method.state_dict(), "optimizer": {}, "scaler": {}, "step": 1, "epoch": 0,
            "step_in_epoch": 1, "rng": {}, "config": to_dict(cfg)}
    return toy, ckpt


def _save_run(root: Path, ckpt: dict) -> Path:
    (root / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, root / "checkpoints" / "ckpt_00000001.pth")
    return root


def _bad_checkpoints(tmp_path: Path, ckpt: dict, marker: Path) -> dict[str, tuple[Path, str]]:
    """Each kind of unusable checkpoint, with a word its refusal must contain."""
    good = tmp_path / "good.pth"
    torch.save(ckpt, good)
    cases: dict[str, tuple[Path, str]] = {}
    cut = tmp_path / "truncated.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases["truncated"] = (cut, "cannot read checkpoint")
    model = dict(ckpt["model"])
    del model["teacher_projector.mlp.0.weight"]
    torch.save(dict(ckpt, model=model), tmp_path / "missing.pth")
    cases["missing key"] = (tmp_path / "missing.pth", "teacher_projector.mlp.0.weight")
    torch.save(dict(ckpt, model=dict(ckpt["model"], **{"extra.weight": torch.zeros(2)})), tmp_path / "extra.pth")
    cases["extra key"] = (tmp_path / "extra.pth", "extra.weight")
    torch.save({"state_dict": ckpt["model"]}, tmp_path / "layout.pth")
    cases["no model/config"] = (tmp_path / "layout.pth", "not a full training checkpoint")
    cfg = json.loads(json.dumps(ckpt["config"]))
    cfg["model"]["num_prototypes"] = "eight"
    torch.save(dict(ckpt, config=cfg), tmp_path / "badcfg.pth")
    cases["config value of the wrong type"] = (tmp_path / "badcfg.pth", "model.num_prototypes")
    cases["code"] = (write_hostile(tmp_path / "code.pth", marker, "system", torch_format=True), "posix.system")
    model = dict(ckpt["model"])
    model["teacher_encoder.layer3.0.conv2.weight"] = model["teacher_encoder.layer3.0.conv2.weight"].clone()
    model["teacher_encoder.layer3.0.conv2.weight"][0, 0, 0, 0] = float("nan")
    torch.save(dict(ckpt, model=model), tmp_path / "nan.pth")
    cases["non-finite"] = (tmp_path / "nan.pth", "teacher_encoder.layer3.0.conv2.weight (1 of")
    # finite weights whose network computes NaN (a negative BN variance): the assignments are refused
    model = dict(ckpt["model"])
    model["teacher_encoder.bn1.running_var"] = -torch.ones_like(model["teacher_encoder.bn1.running_var"])
    torch.save(dict(ckpt, model=model), tmp_path / "negvar.pth")
    cases["NaN assignments"] = (tmp_path / "negvar.pth", "assignments hold")
    return cases


def test_eval_and_visualize_refuse_bad_checkpoints_with_one_line(run_ckpt, tmp_path, capsys):
    toy, ckpt = run_ckpt
    marker = tmp_path / "ran"
    img = str(sorted((toy / "val2017").glob("*.jpg"))[0])
    for name, (path, word) in _bad_checkpoints(tmp_path, ckpt, marker).items():
        out = tmp_path / f"{path.stem}.json"
        assert eval_cli(["unsup_seg", str(path), str(toy), "--no-progress", "--device", "cpu",
                         "--out", str(out)]) == 2, name
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith("refused: ") and word in line, (name, line)
        assert not out.exists(), name  # no plausible-looking score written
        assert visualize_main([str(path), img, "--out", str(tmp_path / "viz"), "--device", "cpu", "--size", "64"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith("refused: ") and word in line, (name, line)
    assert not marker.exists() and not (tmp_path / "viz").exists()


def test_eval_refuses_a_run_whose_teacher_holds_a_nan(run_ckpt, tmp_path, capsys):
    toy, ckpt = run_ckpt
    model = dict(ckpt["model"])
    model["teacher_encoder.layer3.1.conv1.weight"] = model["teacher_encoder.layer3.1.conv1.weight"].clone()
    model["teacher_encoder.layer3.1.conv1.weight"][3, 1, 0, 2] = float("nan")
    run = _save_run(tmp_path / "run", dict(ckpt, model=model))
    assert eval_cli(["unsup_seg", str(run), str(toy), "--no-progress", "--device", "cpu"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "teacher_encoder.layer3.1.conv1.weight (1 of" in line and "non-finite" in line, line
    assert not (run / "eval").exists()
