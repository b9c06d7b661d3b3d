"""A SlotCon step reads the device back from the host only where it must (CPU stand-in for CUDA's sync check).

On a GPU each host read of a device value (``.item()``, ``float(t)``, ``.tolist()``, ``nonzero``,
boolean-mask indexing) stalls the host until the device has caught up. The step's loss needs one
per slot-contrast direction (the selected counts, which size the predictor's batch); the teacher
EMA and the LARS update need none. A dispatch mode records every aten op that implies such a read
(``.tolist()`` bypasses the dispatcher, so it is counted by a wrapper); ``tools/gpu_check.py``
runs the real check, ``torch.cuda.set_sync_debug_mode``, on a GPU.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain.engine.optim import LARS, param_groups, set_lr
from tests.test_slotcon_method import _batch, _model

_READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.repeat_interleave.Tensor")


class HostReads(TorchDispatchMode):
    """Records the aten ops that read a device value back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(_READS):
            self.reads.append(name)
        elif name.startswith("aten.index.Tensor") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
            self.reads.append(name + " (bool mask)")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def tolist_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    calls: list[tuple] = []
    real = torch.Tensor.tolist

    def counted(self: torch.Tensor):
        calls.append(tuple(self.shape))
        return real(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    return calls


def test_the_recorder_sees_each_kind_of_read(tolist_calls) -> None:
    x = torch.randn(6)
    with HostReads() as h:
        float(x.sum())
        x[x > 0]
        (x > 0).nonzero()
        x.tolist()
    assert h.reads == ["aten._local_scalar_dense.default", "aten.index.Tensor (bool mask)", "aten.nonzero.default"]
    assert tolist_calls == [(6,)]


def test_slotcon_step_reads_the_device_once_per_contrast_direction(tolist_calls) -> None:
    model, batch = _model(), _batch()
    opt = LARS(param_groups(model, 1e-5), lr=0.0, momentum=0.9)
    set_lr(opt, 0.1)
    with HostReads() as h:
        model.update_teacher(0.99)
        out = model(batch)
        out["loss"].backward()
        opt.step()
    assert h.reads == []
    assert tolist_calls == [(3,), (3,)]  # slot_contrastive_loss: local count, global count, active keys
    assert torch.isfinite(out["loss"]) and float(out["loss_slot"]) > 0
