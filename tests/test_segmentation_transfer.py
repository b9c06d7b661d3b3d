"""python -m transfer.segmentation on toy datasets in the real VOC / Cityscapes / ADE20K layouts."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torchvision

import transfer.segmentation  # noqa: F401
from mmengine.config import Config
from mmseg.models.backbones import ResNet
from transfer.segmentation.toy_layouts import make_ade20k, make_cityscapes, make_voc
from transfer.segmentation.train import SegArgs, SetupError, build_config, main, parse_overrides, run
from transfer.segmentation.weights import convert, load_converted, mismatched_tensors

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "segmentation"
R18 = ["model.backbone.depth=18", "model.decode_head.in_channels=512"]
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def r18_weights(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A contract-format pretraining checkpoint (torchvision ResNet-18 teacher), converted."""
    d = tmp_path_factory.mktemp("weights")
    tv = torchvision.models.resnet18()
    teacher = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    torch.save({"model": {f"teacher_encoder.{k}": v for k, v in teacher.items()}, "step": 1}, d / "ckpt.pth")
    convert(d / "ckpt.pth", d / "r18_mm.pth")
    return d / "r18_mm.pth", teacher


PROTOCOLS = {
    # config, writer, data-root below the toy root, extra overrides, (train, val) images written
    "voc": ("fcn_d6_r50-d16_voc12aug_smoke.py", make_voc, "VOCdevkit/VOC2012", [], (8, 2)),
    "cityscapes": ("fcn_d6_r50-d16_cityscapes_smoke.py", make_cityscapes, "cityscapes", [], (4, 2)),
    "ade20k": ("fcn_r50-d8_ade20k_smoke.py", make_ade20k, "ade/ADEChallengeData2016",
               ["model.auxiliary_head.in_channels=256"], (4, 2)),
}


def _args(name, root, work, weights, **kw) -> SegArgs:
    cfg, _, sub, extra, _ = PROTOCOLS[name]
    return SegArgs(config=str(CONFIGS / cfg), weights=str(weights) if weights else None, data_root=str(root / sub),
                   work_dir=str(work), overrides=R18 + extra, **kw)


def _train_and_check(name, tmp_path, r18_weights):
    weights, teacher = r18_weights
    PROTOCOLS[name][1](tmp_path / "data")
    record = run(_args(name, tmp_path / "data", tmp_path / "work", weights))
    assert record["iter"] == 2
    assert record["images"] == dict(zip(("train", "val"), PROTOCOLS[name][4]))
    m = record["metrics"]
    # the numbers themselves: tests/test_segmentation_eval_known.py (known answers through the same evaluator)
    assert set(m) >= {"mIoU", "mAcc", "aAcc"} and all(math.isfinite(m[k]) for k in ("mIoU", "mAcc", "aAcc"))
    on_disk = json.loads((tmp_path / "work" / "metrics.json").read_text())
    assert on_disk["metrics"] == m and on_disk["weights"] == str(weights.resolve())
    return record


def test_voc_trains_and_reports_miou(tmp_path, r18_weights):
    _train_and_check("voc", tmp_path, r18_weights)


@pytest.mark.slow  # three Runner builds and two checkpoints: ~75 s (up to ~170 s on a loaded machine)
def test_voc_preempt_resume_report_miou_and_eval_only(tmp_path, r18_weights, monkeypatch):
    """Preempted after iteration 1 (exit 75, checkpoint), --resume finishes, --eval-only reproduces mIoU."""
    import pretrain.engine.signals as signals

    weights, _ = r18_weights
    make_voc(tmp_path / "data")
    calls = []
    monkeypatch.setattr(signals, "stop_requested", lambda: calls.append(1) or len(calls) == 1)
    with pytest.raises(SystemExit) as exc:
        run(_args("voc", tmp_path / "data", tmp_path / "work", weights))
    assert exc.value.code == signals.EXIT_PREEMPTED
    assert (tmp_path / "work" / "last_checkpoint").read_text().endswith("iter_1.pth")
    assert not (tmp_path / "work" / "metrics.json").exists()

    record = run(_args("voc", tmp_path / "data", tmp_path / "work", weights, resume=True))
    assert record["iter"] == 2 and len(calls) == 2  # resumed at iteration 1, ran exactly one more
    assert record["images"] == {"train": 8, "val": 2}
    m = record["metrics"]
    assert set(m) >= {"mIoU", "mAcc", "aAcc"}
    assert json.loads((tmp_path / "work" / "metrics.json").read_text())["metrics"] == m
    # --eval-only reloads the fine-tuned mmengine checkpoint (torch weights_only default + compat)
    # and must give exactly the validation numbers of the end of training.
    again = run(_args("voc", tmp_path / "data", tmp_path / "work", None, eval_only=True))
    assert again["metrics"] == m
    assert json.loads((tmp_path / "work" / "test_metrics.json").read_text())["metrics"] == m


def test_cityscapes_trains_with_slide_inference(tmp_path, r18_weights):
    _train_and_check("cityscapes", tmp_path, r18_weights)


def test_ade20k_trains_and_reports_miou(tmp_path, r18_weights):
    _train_and_check("ade20k", tmp_path, r18_weights)


def test_converted_weights_equal_teacher_after_mmseg_init(r18_weights):
    """What the Runner's Pretrained init puts in the backbone is exactly the teacher encoder."""
    weights, teacher = r18_weights
    backbone = ResNet(depth=18, init_cfg=dict(type="Pretrained", checkpoint=str(weights)))
    backbone.init_weights()
    assert mismatched_tensors(backbone, load_converted(weights)[0]) == []
    for k, v in teacher.items():
        assert torch.equal(backbone.state_dict()[k], v), k
    with torch.no_grad():
        backbone.layer2[0].conv1.weight.add_(1e-3)
    assert mismatched_tensors(backbone, load_converted(weights)[0]) == ["layer2.0.conv1.weight"]


def test_setup_errors_name_what_is_wrong(tmp_path, r18_weights, capsys):
    weights, _ = r18_weights
    voc = make_voc(tmp_path / "data", n_train=2, n_aug=1, n_val=1)
    # a label map listed in the split file is missing
    label = voc / "SegmentationClassAug" / "2007_100000.png"
    saved = label.read_bytes()
    label.unlink()
    with pytest.raises(SetupError, match="2007_100000.png"):
        run(_args("voc", tmp_path / "data", tmp_path / "w", weights))
    label.write_bytes(saved)
    (voc / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(SetupError, match="val.txt"):
        run(_args("voc", tmp_path / "data", tmp_path / "w", weights))
    with pytest.raises(SetupError, match="does not exist"):
        run(_args("cityscapes", tmp_path / "nowhere", tmp_path / "w", weights))
    # Cityscapes: an image without its labelTrainIds
    city = make_cityscapes(tmp_path / "data", n_train=1, n_val=1)
    next((city / "gtFine" / "val").rglob("*.png")).unlink()
    with pytest.raises(SetupError, match="labelTrainIds"):
        run(_args("cityscapes", tmp_path / "data", tmp_path / "w", weights))

    ade = tmp_path / "data"
    make_ade20k(ade, n_train=1, n_val=1)
    # weights of another depth: stop before training, and say which overrides fit them
    args = _args("ade20k", ade, tmp_path / "w", weights)
    args.overrides = []
    with pytest.raises(SetupError, match="model.backbone.depth=18"):
        run(args)
    # a converted file with a backbone key missing: it would stay random
    state, meta = load_converted(weights)
    del state["layer4.1.bn2.weight"]
    torch.save({"state_dict": state, "meta": meta}, tmp_path / "partial.pth")
    with pytest.raises(SetupError, match=r"layer4\.1\.bn2\.weight.*|missing"):
        run(_args("ade20k", ade, tmp_path / "w", tmp_path / "partial.pth"))
    # training needs weights (or an explicit 'random')
    with pytest.raises(SetupError, match="--weights is required"):
        run(_args("ade20k", ade, tmp_path / "w", None))
    # the CLI turns these into one line and exit code 2
    assert main(["--config", str(CONFIGS / PROTOCOLS["ade20k"][0]), "--weights", str(weights),
                 "--data-root", str(ade / "ade/ADEChallengeData2016"), "--work-dir", str(tmp_path / "w")]) == 2
    assert "model.backbone.depth=18" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_overrides_batch_split_and_norm(monkeypatch):
    cfg = Config.fromfile(str(CONFIGS / "fcn_d6_r50-d16_513x513_30k_voc12aug.py"))
    assert parse_overrides(cfg, ["train_cfg.max_iters=100", "model.decode_head.dilation=12"]) == {
        "train_cfg.max_iters": 100, "model.decode_head.dilation": 12}
    with pytest.raises(KeyError, match="train_cfg.max_iter"):
        parse_overrides(cfg, ["train_cfg.max_iter=100"])
    with pytest.raises(TypeError, match="train_cfg.max_iters"):
        parse_overrides(cfg, ["train_cfg.max_iters=abc"])
    assert parse_overrides(cfg, ["+custom.key=1"]) == {"custom.key": 1}

    # Protocol: total batch 16, ResNet-50 D16 with a dilation-6 head, SyncBN -> BN without CUDA/processes.
    base = dict(config=str(CONFIGS / "fcn_d6_r50-d16_513x513_30k_voc12aug.py"), weights="random")
    one = build_config(SegArgs(**base))
    assert one.train_dataloader.batch_size == 16 and one.total_batch_size == 16
    assert one.model.backbone.type == "ResNet" and one.model.backbone.depth == 50
    assert one.model.backbone.strides == (1, 2, 2, 1) and one.model.backbone.dilations == (1, 1, 1, 2)
    assert one.model.decode_head.dilation == 6 and one.model.auxiliary_head is None
    assert one.train_cfg.max_iters == 30000 and one.optim_wrapper.optimizer.lr == 0.003
    assert one.model.backbone.norm_cfg.type == "BN" and one.model.decode_head.norm_cfg.type == "BN"  # one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    two = build_config(SegArgs(**base, launcher="pytorch", gpus=2))
    assert two.train_dataloader.batch_size == 8 and two.launcher == "pytorch"
    with pytest.raises(ValueError, match="--gpus 4"):
        build_config(SegArgs(**base, launcher="pytorch", gpus=4))
    city = build_config(SegArgs(config=str(CONFIGS / "fcn_d6_r50-d16_769x769_90k_cityscapes.py"), weights="random"))
    assert city.model.test_cfg.mode == "slide" and city.model.test_cfg.crop_size == (769, 769)
    assert city.train_cfg.max_iters == 90000
    ade = build_config(SegArgs(config=str(CONFIGS / "fcn_r50-d8_512x512_80k_ade20k.py"), weights="/x/w.pth"))
    assert ade.train_cfg.max_iters == 80000 and ade.model.decode_head.num_classes == 150
    assert ade.model.backbone.init_cfg == dict(type="Pretrained", checkpoint="/x/w.pth")


@pytest.mark.slow  # two processes on the shared CPU: ~1-2 min wall
def test_two_process_gloo_run_splits_the_batch(tmp_path, r18_weights):
    """--gpus 2 --launcher none relaunches itself through torchrun (gloo on CPU): DDP, batch 16/2 per process."""
    import subprocess
    import sys

    weights, _ = r18_weights
    make_voc(tmp_path / "data")
    cmd = [sys.executable, "-m", "transfer.segmentation", "--config", str(CONFIGS / PROTOCOLS["voc"][0]),
           "--weights", str(weights), "--data-root", str(tmp_path / "data/VOCdevkit/VOC2012"),
           "--work-dir", str(tmp_path / "work"), "--gpus", "2", *R18, "total_batch_size=4"]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "work" / "metrics.json").read_text())
    assert rec["world_size"] == 2 and rec["total_batch_size"] == 4 and rec["iter"] == 2
    assert rec["images"] == {"train": 8, "val": 2} and math.isfinite(rec["metrics"]["mIoU"])
    effective = (tmp_path / "work" / PROTOCOLS["voc"][0]).read_text()  # mmengine's dump of the effective config
    assert "batch_size=2," in effective and "total_batch_size = 4" in effective  # 4 split over 2 processes
