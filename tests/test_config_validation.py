"""Every rule of every config section is checked by ``load_config``, before anything is built."""
from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain import train as train_cli
from pretrain.config import (LOG_RULES, OPTIM_RULES, TRAIN_RULES, Amp, ConfigError, Device, OptimName, PretrainConfig,
                             load_config, save_config, to_dict)
from pretrain.config_rules import Choice
from pretrain.data.config import DATA_RULES, Dataset, Loader
from pretrain.methods.config import MODEL_RULES

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "pretrain").glob("*.yaml"))

# One bad value per rule: (overrides, the key the error must name, a piece of what it must say is allowed).
BAD = [
    # top level
    (["name="], "name", "non-empty"),
    # data
    (["data.dataset=cifar"], "data.dataset", "toy, coco, cocoplus, imagenet, folder"),
    (["data.root="], "data.root", "non-empty"),
    (["data.loader=dali"], "data.loader", "pil, ffcv"),
    (["data.loader=ffcv", "data.ffcv_path="], "data.ffcv_path", "data.loader=ffcv"),
    (["data.image_size=4"], "data.image_size", ">= 8"),
    (["data.min_scale=0"], "data.min_scale", "(0, 1]"),
    (["data.min_scale=2"], "data.min_scale", "(0, 1]"),
    (["data.max_scale=1.5"], "data.max_scale", "(0, 1]"),
    (["data.min_scale=0.9", "data.max_scale=0.5"], "data.min_scale", "<= data.max_scale (0.5)"),
    (["data.min_overlap=1"], "data.min_overlap", "[0, 1)"),
    (["data.min_overlap=-0.1"], "data.min_overlap", "[0, 1)"),
    (["data.flip_p=1.5"], "data.flip_p", "[0, 1]"),
    (["data.vflip_p=-0.5"], "data.vflip_p", "[0, 1]"),
    (["data.color_jitter=[0.4,0.4,0.2]"], "data.color_jitter", "4 numbers"),
    (["data.color_jitter=[-0.1,0.4,0.2,0.1]"], "data.color_jitter", ">= 0"),
    (["data.color_jitter=[0.4,0.4,0.2,0.6]"], "data.color_jitter", "<= 0.5"),
    (["data.color_jitter_p=2"], "data.color_jitter_p", "[0, 1]"),
    (["data.grayscale_p=-0.2"], "data.grayscale_p", "[0, 1]"),
    (["data.blur_p=[1.0]"], "data.blur_p", "2 numbers"),
    (["data.blur_p=[1.0,1.1]"], "data.blur_p", "[0, 1]"),
    (["data.solarize_p=[0.0,0.2,0.2]"], "data.solarize_p", "2 numbers"),
    (["data.solarize_p=[0.0,-0.2]"], "data.solarize_p", "[0, 1]"),
    (["data.num_workers=-1"], "data.num_workers", ">= 0"),
    (["data.max_bad_fraction=2"], "data.max_bad_fraction", "[0, 1]"),
    (["data.toy_n_train=0"], "data.toy_n_train", ">= 1"),
    (["data.toy_n_val=0"], "data.toy_n_val", ">= 1"),
    (["data.toy_size=0"], "data.toy_size", ">= 1"),
    (["data.toy_seed=-1"], "data.toy_seed", "[0, 4294967296)"),
    # model
    (["model.method=byol"], "model.method", "slotcon"),
    (["model.arch=resnet101"], "model.arch", "resnet18"),
    (["model.grouping=kmeans"], "model.grouping", "prototypes"),
    (["model.num_prototypes=0"], "model.num_prototypes", ">= 1"),
    (["model.dim_hidden=0"], "model.dim_hidden", ">= 1"),
    (["model.dim_out=0"], "model.dim_out", ">= 1"),
    (["model.teacher_momentum=1.5"], "model.teacher_momentum", "[0, 1]"),
    (["model.tau_s=0"], "model.tau_s", "> 0"),
    (["model.tau_t=-0.07"], "model.tau_t", "> 0"),
    (["model.center_momentum=-0.1"], "model.center_momentum", "[0, 1]"),
    (["model.tau_c=0"], "model.tau_c", "> 0"),
    (["model.lambda_g=1.5"], "model.lambda_g", "[0, 1]"),
    (["model.last_stride=3"], "model.last_stride", "[1, 2]"),
    (["model.pool_eps=0"], "model.pool_eps", "> 0"),
    (["model.slot_iters=0"], "model.slot_iters", ">= 1"),
    (["model.slot_eps=-1e-8"], "model.slot_eps", "> 0"),
    (["model.object_loss=l2"], "model.object_loss", "ctr_img"),
    (["model.tau_obj=0"], "model.tau_obj", "> 0"),
    (["model.tau_global=0"], "model.tau_global", "> 0"),
    (["model.lambda_obj=-1"], "model.lambda_obj", ">= 0"),
    (["model.lambda_global=-1"], "model.lambda_global", ">= 0"),
    (["model.method=objglobal", "model.lambda_obj=0", "model.lambda_global=0"], "model.lambda_obj", "> 0"),
    # optim
    (["optim.name=adam"], "optim.name", "lars, sgd, adamw"),
    (["optim.base_lr=0"], "optim.base_lr", "> 0"),
    (["optim.weight_decay=-1e-5"], "optim.weight_decay", ">= 0"),
    (["optim.momentum=1"], "optim.momentum", "[0, 1)"),
    (["optim.lars_eta=0"], "optim.lars_eta", "> 0"),
    (["optim.warmup_epochs=-1"], "optim.warmup_epochs", ">= 0"),
    (["train.epochs=3", "optim.warmup_epochs=5"], "optim.warmup_epochs", "<= train.epochs (3)"),
    (["optim.min_lr=-1e-6"], "optim.min_lr", ">= 0"),
    (["optim.base_lr=0.1", "optim.batch_size=256", "optim.min_lr=0.5"], "optim.min_lr", "peak learning rate 0.1"),
    (["optim.scale_lr=false", "optim.base_lr=0.1", "optim.min_lr=0.2"], "optim.min_lr", "peak learning rate 0.1"),
    (["optim.batch_size=0"], "optim.batch_size", ">= 1"),
    (["optim.clip_grad=-1"], "optim.clip_grad", ">= 0"),
    # train
    (["train.epochs=0"], "train.epochs", ">= 1"),
    (["train.max_steps=-1"], "train.max_steps", ">= 0"),
    (["train.seed=-1"], "train.seed", "[0, 4294967296)"),
    (["train.device=tpu"], "train.device", "auto, cpu, cuda"),
    (["train.amp=fp8"], "train.amp", "auto, none, bf16, fp16"),
    (["train.checkpoint_every_steps=-1"], "train.checkpoint_every_steps", ">= 0"),
    (["train.keep_last=0"], "train.keep_last", ">= 1"),
    (["train.resume="], "train.resume", "non-empty"),
    # log
    (["log.every_steps=-1"], "log.every_steps", ">= 0"),
    (["log.image_every_steps=-1"], "log.image_every_steps", ">= 0"),
    (["log.image_every_steps=10", "log.num_images=0"], "log.num_images", ">= 1"),
    # NaN and infinity, as YAML writes them and as a user types them
    (["optim.base_lr=.nan"], "optim.base_lr", "finite"),
    (["optim.base_lr=nan"], "optim.base_lr", "finite"),
    (["optim.base_lr=inf"], "optim.base_lr", "finite"),
    (["optim.min_lr=-.inf"], "optim.min_lr", "finite"),
    (["optim.weight_decay=.inf"], "optim.weight_decay", "finite"),
    (["optim.warmup_epochs=nan"], "optim.warmup_epochs", "finite"),
    (["optim.clip_grad=inf"], "optim.clip_grad", "finite"),
    (["data.max_bad_fraction=.nan"], "data.max_bad_fraction", "finite"),
    (["data.min_scale=nan"], "data.min_scale", "finite"),
    (["data.blur_p=[.nan,0.1]"], "data.blur_p", "finite"),
    (["data.color_jitter=[0.4,inf,0.2,0.1]"], "data.color_jitter", "finite"),
    (["model.tau_t=inf"], "model.tau_t", "finite"),
    (["model.teacher_momentum=nan"], "model.teacher_momentum", "finite"),
    (["model.lambda_g=.nan"], "model.lambda_g", "finite"),
]


@pytest.mark.parametrize("overrides, key, allowed", BAD, ids=[" ".join(o) for o, _, _ in BAD])
def test_bad_value_is_a_config_error_naming_the_key(overrides, key, allowed):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert f"'{key}'" in msg, msg
    assert allowed in msg, msg
    assert "\n" not in msg


def test_message_names_key_allowed_and_value():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.min_scale=2"])
    assert str(e.value) == "config key 'data.min_scale' must be in (0, 1], got 2.0"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.num_prototypes=0"])
    assert str(e.value) == "config key 'model.num_prototypes' must be >= 1, got 0"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.method=byol"])
    assert str(e.value) == "config key 'model.method' must be one of the registered methods ['objglobal', 'slotcon'], got 'byol'"


def test_non_finite_floats_in_a_yaml_file(tmp_path):
    for text, key in (("optim:\n  base_lr: .nan\n", "optim.base_lr"), ("data:\n  max_bad_fraction: .inf\n",
                                                                       "data.max_bad_fraction"),
                      ("model:\n  tau_c: -.inf\n", "model.tau_c")):
        p = tmp_path / "bad.yaml"
        p.write_text(text)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ".*finite"):
            load_config(p)


def test_boundary_values_are_accepted():
    cfg = load_config(None, ["data.min_scale=1", "data.max_scale=1", "data.min_overlap=0", "data.flip_p=1",
                             "data.color_jitter=[0,0,0,0.5]", "data.max_bad_fraction=0", "data.num_workers=0",
                             "model.num_prototypes=1", "model.teacher_momentum=1", "model.center_momentum=0",
                             "model.lambda_g=0", "model.last_stride=1", "optim.momentum=0", "optim.min_lr=0",
                             "optim.clip_grad=0", "optim.warmup_epochs=0", "train.keep_last=1",
                             "train.seed=4294967295", "log.image_every_steps=0", "log.num_images=0"])
    assert cfg.model.num_prototypes == 1 and cfg.log.num_images == 0
    # pictures off by the other switch: num_images is not used
    assert load_config(None, ["log.tensorboard=false", "log.num_images=0"]).log.num_images == 0


# Fields a rule table leaves out on purpose (booleans and enums are checked by OmegaConf itself).
UNCHECKED = {
    "data.ffcv_path",  # checked across fields: needed only with data.loader=ffcv
    "train.output_dir",  # "" is the working directory
    "train.run_dir",  # "" means output_dir/<name>
    "log.num_images",  # checked across fields: needed only when pictures are on
}


def test_every_field_has_a_rule():
    """A new field needs a rule (or a reason above): a value is never first checked by the code using it."""
    tables = {"data": DATA_RULES, "model": MODEL_RULES, "optim": OPTIM_RULES, "train": TRAIN_RULES, "log": LOG_RULES}
    cfg = PretrainConfig()
    missing = []
    for section, table in tables.items():
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            key = f"{section}.{f.name}"
            if isinstance(value, (bool, Choice)) or key in UNCHECKED:
                continue
            if f.name not in table:
                missing.append(key)
        assert set(table) <= {f.name for f in dataclasses.fields(getattr(cfg, section))}, section
    assert missing == []


def test_enum_choices_match_the_code_that_uses_them():
    from pretrain.data.datasets import _LAYOUTS
    from pretrain.engine.optim import build_optimizer
    from pretrain.engine.precision import AMP_CHOICES

    assert sorted(d.value for d in Dataset) == sorted(_LAYOUTS)
    assert tuple(a.value for a in Amp) == AMP_CHOICES
    assert [lo.value for lo in Loader] == ["pil", "ffcv"]
    assert [d.value for d in Device] == ["auto", "cpu", "cuda"]
    for name in OptimName:
        assert isinstance(build_optimizer(torch.nn.Linear(2, 2), name, lr=0.1, weight_decay=0.0, momentum=0.9),
                          torch.optim.Optimizer)


def test_choices_behave_as_their_strings():
    cfg = load_config(None, ["data.loader=ffcv", "data.ffcv_path=x.beton", "train.amp=fp16", "optim.name=sgd"])
    assert isinstance(cfg.data.loader, Loader) and isinstance(cfg.train.amp, Amp)
    assert cfg.data.loader == "ffcv" and cfg.train.amp == "fp16" and cfg.optim.name != "lars"
    assert f"{cfg.data.loader}" == "ffcv" and str(cfg.train.amp) == "fp16" and "%s" % cfg.optim.name == "sgd"
    assert f"{cfg.train.device:>6}" == "  auto" and "{}".format(cfg.data.dataset) == "toy"
    assert {"fp16": 1}[cfg.train.amp] == 1 and {"fp16": 1}.get(cfg.train.amp) == 1
    assert Path("runs") / cfg.data.dataset == Path("runs/toy")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_loads_and_its_saved_yaml_reloads(path, tmp_path):
    cfg = load_config(path)
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def _primitive_only(x) -> bool:
    if type(x) is dict:
        return all(type(k) is str and _primitive_only(v) for k, v in x.items())
    if type(x) is list:
        return all(_primitive_only(v) for v in x)
    return x is None or type(x) in (str, int, float, bool)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_to_dict_holds_only_primitives_and_loads_with_weights_only(path):
    d = to_dict(load_config(path))
    assert _primitive_only(d)
    assert d["train"]["amp"] in ("auto", "none", "bf16", "fp16") and type(d["data"]["loader"]) is str
    buf = io.BytesIO()
    torch.save({"config": d}, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["config"] == d


def test_cli_config_error_builds_nothing(monkeypatch, capsys):
    def no_run(cfg, hooks=None):
        raise AssertionError("a bad config reached the training")

    monkeypatch.setattr(train_cli, "run", no_run)
    assert train_cli.main([str(ROOT / "configs/pretrain/demo_cpu.yaml"), "model.num_prototypes=0"]) == 64
    assert "model.num_prototypes" in capsys.readouterr().err


def test_python_m_pretrain_exits_64_before_any_run_dir(tmp_path):
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "pretrain", str(ROOT / "configs/pretrain/demo_cpu.yaml"),
                        "data.min_scale=2", f"train.output_dir={runs}", f"data.root={tmp_path / 'toy'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 64, p.stderr
    # one line for the error (an unrelated warning of some library at import may precede it)
    errors = [line for line in p.stderr.splitlines() if "config" in line]
    assert errors == ["config error: config key 'data.min_scale' must be in (0, 1], got 2.0"], p.stderr
    assert "Traceback" not in p.stderr
    assert list(tmp_path.iterdir()) == []  # no run dir, no toy scenes, nothing
