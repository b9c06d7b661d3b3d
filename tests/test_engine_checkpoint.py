"""Checkpoint files: atomic write, keep-last-k, newest *loadable* resume, RNG state, backbone export."""
from __future__ import annotations

import logging
import random

import numpy as np
import torch
import torchvision

from pretrain.engine import checkpoint as ck


def _state(step: int) -> dict:
    return {"model": {"teacher_encoder.conv1.weight": torch.full((2, 3), float(step)), "center": torch.zeros(4)},
            "optimizer": {"state": {}, "param_groups": []}, "scaler": {}, "step": step, "epoch": 0,
            "step_in_epoch": step, "rng": ck.rng_state(), "config": {"model": {"arch": "resnet18"}}}


def test_keep_last_and_newest_first(tmp_path):
    for s in (2, 4, 6, 8, 10):
        ck.save_checkpoint(tmp_path, _state(s), keep_last=3)
    names = [p.name for p in ck.list_checkpoints(tmp_path)]
    assert names == ["ckpt_00000010.pth", "ckpt_00000008.pth", "ckpt_00000006.pth"]
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind
    path, state = ck.find_latest(tmp_path)
    assert state["step"] == 10 and state["model"]["teacher_encoder.conv1.weight"][0, 0] == 10.0


def test_truncated_and_corrupt_newest_are_skipped(tmp_path, caplog):
    for s in (1, 2, 3):
        ck.save_checkpoint(tmp_path, _state(s), keep_last=5)
    newest = ck.checkpoint_path(tmp_path, 3)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a crash mid-copy
    ck.checkpoint_path(tmp_path, 4).write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        path, state = ck.find_latest(tmp_path)
    assert state["step"] == 2 and path.name == "ckpt_00000002.pth"
    assert "ckpt_00000004.pth" in caplog.text and "ckpt_00000003.pth" in caplog.text
    assert ck.find_latest(tmp_path / "missing") is None


def test_checkpoint_loads_weights_only_and_restores_rng(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    st = _state(5)
    expect = (random.random(), float(np.random.rand()), float(torch.rand(())))
    ck.save_checkpoint(tmp_path, st, keep_last=1)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    loaded = torch.load(ck.checkpoint_path(tmp_path, 5), weights_only=True)
    ck.set_rng_state(loaded["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expect


def test_export_backbone_and_tool(tmp_path):
    net = torchvision.models.resnet18()
    del net.fc
    ck.export_backbone(net, "resnet18", tmp_path / "b.pth")
    out = torch.load(tmp_path / "b.pth", weights_only=True)
    assert out["arch"] == "resnet18" and set(out["backbone"]) == set(net.state_dict())
    ck.save_checkpoint(tmp_path, _state(7), keep_last=1)
    ck.export_teacher_backbone(ck.checkpoint_path(tmp_path, 7), tmp_path / "t.pth")
    t = torch.load(tmp_path / "t.pth", weights_only=True)
    assert t["arch"] == "resnet18" and list(t["backbone"]) == ["conv1.weight"]
    assert t["backbone"]["conv1.weight"][0, 0] == 7.0
