"""``python -m pretrain.engine.checkpoint RUN OUT --random-init``: the transfer baseline is the run's own
initial encoder (same seed, same variant), not another initialisation scheme."""
from __future__ import annotations

import dataclasses

import torch

from pretrain.engine.checkpoint import _main as export_main
from pretrain.methods import ModelConfig, build_method


def _run_checkpoint(tmp_path, seed: int = 3):
    cfg = ModelConfig(arch="resnet18", num_prototypes=6, dim_hidden=32, dim_out=16, stem_pool=False,
                      zero_init_residual=True)
    torch.manual_seed(seed)
    initial = build_method(cfg).teacher_backbone().state_dict()
    trained = {f"teacher_encoder.{k}": v + 0.5 if v.is_floating_point() else v for k, v in initial.items()}
    torch.manual_seed(seed)
    state = build_method(cfg).state_dict()
    state.update(trained)
    path = tmp_path / "ckpt_00000010.pth"
    torch.save({"model": state, "optimizer": {}, "step": 10, "epoch": 1, "step_in_epoch": 0, "config": {"model": dataclasses.asdict(cfg), "train": {"seed": seed}}},
               path)
    return path, initial


def test_random_init_export_is_the_runs_initial_encoder(tmp_path):
    path, initial = _run_checkpoint(tmp_path)
    assert export_main([str(path), str(tmp_path / "init.pth"), "--random-init"]) == 0
    out = torch.load(tmp_path / "init.pth", weights_only=True)
    assert out["arch"] == "resnet18" and out["encoder"] == {"stem_pool": False, "last_stride": 2}
    assert out["backbone"].keys() == initial.keys()
    for k, v in initial.items():
        assert torch.equal(out["backbone"][k], v), k
    assert float(out["backbone"]["layer1.0.bn2.weight"].abs().max()) == 0.0  # zero-initialised residual


def test_trained_export_records_the_variant(tmp_path):
    path, initial = _run_checkpoint(tmp_path)
    assert export_main([str(path), str(tmp_path / "teacher.pth")]) == 0
    out = torch.load(tmp_path / "teacher.pth", weights_only=True)
    assert out["encoder"] == {"stem_pool": False, "last_stride": 2}
    assert torch.equal(out["backbone"]["conv1.weight"], initial["conv1.weight"] + 0.5)
