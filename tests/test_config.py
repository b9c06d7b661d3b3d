"""Pretrain config: YAML + overrides -> typed dataclasses; errors name the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import ConfigError, PretrainConfig, load_config, save_config
from pretrain.train import main, parse_args

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["optim.base_lr=0.5", "train.amp=none", "model.num_prototypes=32",
                             "data.color_jitter=[0.1,0.2,0.3,0.4]", "train.max_steps=7"])
    assert isinstance(cfg, PretrainConfig)
    assert cfg.optim.base_lr == 0.5 and isinstance(cfg.optim.base_lr, float)
    assert cfg.train.amp == "none" and cfg.train.max_steps == 7
    assert cfg.model.num_prototypes == 32
    assert cfg.data.color_jitter == [0.1, 0.2, 0.3, 0.4]


@pytest.mark.parametrize("override, names", [
    ("optim.lrr=1", ["optim.lrr", "base_lr", "warmup_epochs", "batch_size"]),
    ("trian.epochs=3", ["trian", "train", "optim", "log"]),
    ("model.num_protos=3", ["model.num_protos", "num_prototypes", "tau_t"]),
])
def test_unknown_override_names_key_and_lists_valid_keys(override, names):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for n in names:
        assert n in str(e.value)


@pytest.mark.parametrize("override, key", [
    ("optim.base_lr=abc", "optim.base_lr"),
    ("train.epochs=1.5", "train.epochs"),
    ("train.amp=fp8", "train.amp"),
    ("optim.name=adam", "optim.name"),
    ("optim.batch_size=0", "optim.batch_size"),
    ("optim", "optim"),
    ("optim=3", "optim"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value)


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  name: lars\n  warmup: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "optim.warmup" in str(e.value) and "warmup_epochs" in str(e.value)
    p.write_text("train:\n  epochs: many\n")
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(p)


def test_effective_config_roundtrip(tmp_path):
    cfg = load_config(CONFIGS / "slotcon_coco_r50_800ep.yaml", ["data.root=/datasets/coco", "train.seed=3"])
    assert cfg.name == "slotcon_coco_r50_800ep"
    assert cfg.data.ffcv_path == "/datasets/coco/coco_train.beton"  # interpolation follows the override
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


@pytest.mark.parametrize("name, k, epochs", [
    ("slotcon_coco_r50_800ep", 256, 800), ("slotcon_cocoplus_r50_800ep", 256, 800),
    ("slotcon_imagenet_r50_100ep", 2048, 100), ("slotcon_imagenet_r50_200ep", 2048, 200),
])
def test_published_settings(name, k, epochs):
    """SlotCon Sec. 4.1: batch 512, LARS, LR 1.0 x bs/256, wd 1e-5, 5 warm-up epochs, cosine, AMP."""
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert (cfg.model.num_prototypes, cfg.train.epochs) == (k, epochs)
    assert cfg.model.arch == "resnet50"
    o = cfg.optim
    assert (o.name, o.batch_size, o.base_lr, o.scale_lr, o.weight_decay, o.warmup_epochs, o.min_lr, o.momentum) == \
        ("lars", 512, 1.0, True, 1e-5, 5.0, 1e-6, 0.9)
    assert cfg.train.amp != "none"
    m = cfg.model
    assert (m.tau_s, m.tau_t, m.center_momentum, m.tau_c, m.lambda_g, m.teacher_momentum) == \
        (0.1, 0.07, 0.9, 0.2, 0.5, 0.99)


def test_demo_config_is_small():
    cfg = load_config(CONFIGS / "demo_cpu.yaml")
    assert cfg.data.dataset == "toy" and cfg.model.arch == "resnet18" and cfg.data.image_size <= 96


def test_cli_config_error_exit_code(capsys):
    assert main(["optim.bogus=1"]) == 64
    assert "optim.bogus" in capsys.readouterr().err
    assert parse_args(["a.yaml", "x.y=1"]) == ("a.yaml", ["x.y=1"])
    assert parse_args(["x.y=1"]) == (None, ["x.y=1"])
