"""Converters accept a run directory: it resolves to the newest checkpoint that loads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain.methods import build_method
from pretrain.methods.config import ModelConfig
from transfer.checkpoint_io import CheckpointError, load_teacher_encoder


def _save(path: Path, method: torch.nn.Module, step: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": method.state_dict(), "step": step, "epoch": 0, "step_in_epoch": step, "optimizer": {}}, path)


def test_run_dir_resolves_to_newest_loadable_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    method = build_method(ModelConfig(arch="resnet18", num_prototypes=4, dim_hidden=16, dim_out=8))
    _save(tmp_path / "checkpoints" / "ckpt_00000001.pth", method, 1)
    with torch.no_grad():  # the newer checkpoint has a different teacher
        for p in method.teacher_encoder.parameters():
            p.add_(1.0)
    _save(tmp_path / "checkpoints" / "ckpt_00000002.pth", method, 2)
    expected = {k: v for k, v in method.teacher_encoder.state_dict().items() if "num_batches_tracked" not in k}
    state, arch = load_teacher_encoder(tmp_path)
    assert arch == "resnet18"
    assert state.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(state[k], expected[k].float())
    # A truncated newest checkpoint is skipped in favour of the previous one.
    newest = tmp_path / "checkpoints" / "ckpt_00000003.pth"
    newest.write_bytes((tmp_path / "checkpoints" / "ckpt_00000002.pth").read_bytes()[:100])
    state3, _ = load_teacher_encoder(tmp_path)
    torch.testing.assert_close(state3["conv1.weight"], expected["conv1.weight"])


def test_run_dir_without_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="without a loadable checkpoint"):
        load_teacher_encoder(tmp_path)
