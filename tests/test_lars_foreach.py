"""Both LARS implementations are bit-exact with each other (CPU): ``torch._foreach_*`` on whole lists
(``foreach=True``, the CUDA default) and the per-parameter loop (``foreach=False``, the CPU default,
the update as it was before the lists existed). Both optimisers step identical
copies of a network with identical gradients for several steps and changing learning rates;
parameters and momentum buffers must be equal bit for bit, across weight decay / trust-ratio
groups, a zero weight (trust ratio 1), a zero update, parameters without a gradient this step,
and a dtype of its own (a separate foreach bucket).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pretrain.engine.optim import LARS, param_groups, set_lr


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)
        self.zero_w = nn.Parameter(torch.zeros(4, 3))  # ||w|| = 0 at the first step: ratio 1
        self.still = nn.Parameter(torch.randn(3, 3))  # gets a zero gradient: ||d|| = 0 without decay
        self.sometimes = nn.Parameter(torch.randn(6, 2))  # no gradient on odd steps
        self.wide = nn.Parameter(torch.randn(5, 4, dtype=torch.float64))  # its own foreach bucket


def _groups(net: Net, wd: float) -> list[dict]:
    groups = param_groups(net, wd)
    # one more trust-ratio group without weight decay, for the ||d|| = 0 case
    still = [net.still]
    groups[0]["params"] = [p for p in groups[0]["params"] if p is not net.still]
    groups.append({"params": still, "weight_decay": 0.0, "lars": True, "name": "lars_no_decay"})
    return groups


def _set_grads(net: Net, step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for name, p in net.named_parameters():
        if name == "sometimes" and step % 2:
            p.grad = None
        elif name == "still":
            p.grad = torch.zeros_like(p)
        else:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.1 + step)


def test_lists_are_bit_exact_with_the_loop() -> None:
    a = Net()
    b = copy.deepcopy(a)
    new = LARS(_groups(a, 1e-2), lr=0.0, momentum=0.9, eta=1e-3, foreach=True)
    ref = LARS(_groups(b, 1e-2), lr=0.0, momentum=0.9, eta=1e-3, foreach=False)
    for step in range(6):
        lr = 0.5 * (step + 1)
        set_lr(new, lr)
        set_lr(ref, lr)
        _set_grads(a, step)
        _set_grads(b, step)
        grads_before = {n: None if p.grad is None else p.grad.clone() for n, p in a.named_parameters()}
        new.step()
        ref.step()
        for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(pa, pb), (step, n, (pa - pb).abs().max())
            if grads_before[n] is not None:
                assert torch.equal(pa.grad, grads_before[n]), f"{n}: .grad modified by the step"
        for pa, pb in zip(a.parameters(), b.parameters()):
            sa, sb = new.state.get(pa), ref.state.get(pb)
            assert (sa is None) == (sb is None)
            if sa is not None:
                assert torch.equal(sa["mu"], sb["mu"])
    # the cases the test is about really happened
    assert not torch.equal(a.zero_w, torch.zeros(4, 3))
    assert torch.equal(a.still, b.still)
    assert new.state_dict()["param_groups"] == ref.state_dict()["param_groups"]


def test_lars_device_default_and_state_dict_round_trip_continue_identically(monkeypatch: pytest.MonkeyPatch) -> None:
    lists: list[int] = []
    real = LARS._update
    monkeypatch.setattr(LARS, "_update", lambda self, params, g: (lists.append(len(params)), real(self, params, g)))
    a = Net()
    opt = LARS(_groups(a, 1e-3), lr=0.3, momentum=0.9)
    _set_grads(a, 0)
    opt.step()
    b = copy.deepcopy(a)
    opt_b = LARS(_groups(b, 1e-3), lr=0.3, momentum=0.9)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))
    for net, o in ((a, opt), (b, opt_b)):
        _set_grads(net, 2)
        o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert lists == []  # CPU parameters: the per-parameter loop by default (faster there)
    c = Net()
    _set_grads(c, 0)
    LARS(_groups(c, 1e-3), lr=0.3, foreach=True).step()
    assert lists  # forced
