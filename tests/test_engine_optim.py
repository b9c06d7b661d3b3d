"""LARS (Barlow Twins / SlotCon variant), param groups, LR and teacher-momentum schedules."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from pretrain.engine.optim import LARS, build_optimizer, param_groups
from pretrain.engine.schedules import lr_at, momentum_at, peak_lr


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))


def _grads(step: int, model: nn.Module) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_param_groups_split_by_dimension_and_skip_frozen():
    net = _net()
    net[3].bias.requires_grad_(False)
    groups = param_groups(net, 1e-5)
    decay = {id(p) for p in groups[0]["params"]}
    plain = {id(p) for p in groups[1]["params"]}
    assert decay == {id(net[0].weight), id(net[3].weight)}
    assert plain == {id(net[0].bias), id(net[1].weight), id(net[1].bias)}
    assert groups[0]["weight_decay"] == 1e-5 and groups[1]["weight_decay"] == 0.0
    assert groups[0]["lars"] and not groups[1]["lars"]


def test_lars_matches_formula_and_leaves_1d_params_as_sgd_momentum():
    lr, wd, mom, eta = 0.7, 1e-2, 0.9, 1e-3
    a, b = _net(), _net()
    lars = build_optimizer(a, "lars", lr=lr, weight_decay=wd, momentum=mom, eta=eta)
    sgd = torch.optim.SGD(b.parameters(), lr=lr, momentum=mom)  # no wd: reference for the 1-D params
    w0 = copy.deepcopy(a.state_dict())
    mu = {n: torch.zeros_like(p) for n, p in a.named_parameters()}
    expect = {n: p.detach().clone() for n, p in a.named_parameters()}
    for step in range(3):
        _grads(step, a)
        _grads(step, b)
        # reference for the >1-D weights, Barlow Twins' LARS written out
        for n, p in a.named_parameters():
            if p.ndim > 1:
                d = p.grad + wd * expect[n]
                q = eta * expect[n].norm() / d.norm()
                mu[n] = mom * mu[n] + q * d
                expect[n] = expect[n] - lr * mu[n]
        lars.step()
        sgd.step()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.ndim == 1:
            torch.testing.assert_close(pa, pb, rtol=0, atol=1e-7)  # unscaled, no weight decay
            assert not torch.equal(pa, w0[n])
        else:
            torch.testing.assert_close(pa, expect[n], rtol=1e-6, atol=1e-7)
            # the trust ratio really scaled it: plain SGD would have moved it far more
            assert (pa - w0[n]).norm() < 0.1 * (pb - w0[n]).norm()


def test_lars_zero_weight_gets_unit_trust_ratio():
    p = nn.Parameter(torch.zeros(3, 2))
    opt = LARS([{"params": [p], "weight_decay": 0.0, "lars": True}], lr=0.5, momentum=0.0)
    p.grad = torch.ones(3, 2)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3, 2), -0.5))


def test_lars_state_dict_loads_weights_only(tmp_path):
    net = _net()
    opt = build_optimizer(net, "lars", lr=0.1, weight_decay=1e-5, momentum=0.9)
    _grads(0, net)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "o.pth")
    sd = torch.load(tmp_path / "o.pth", weights_only=True)
    opt2 = build_optimizer(_net(), "lars", lr=0.1, weight_decay=1e-5, momentum=0.9)
    opt2.load_state_dict(sd)
    assert len(opt2.state) == len(list(net.parameters()))


def test_sgd_option_has_no_decay_on_1d():
    net = _net()
    opt = build_optimizer(net, "sgd", lr=0.1, weight_decay=0.5, momentum=0.9)
    assert isinstance(opt, torch.optim.SGD)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    with pytest.raises(ValueError, match="adam"):
        build_optimizer(net, "adam", lr=0.1, weight_decay=0.0, momentum=0.9)


def test_adamw_option_has_no_decay_on_1d_and_betas_from_momentum():
    net = _net()
    opt = build_optimizer(net, "adamw", lr=1e-3, weight_decay=0.04, momentum=0.9)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.04, 0.0]
    assert all(g["betas"] == (0.9, 0.999) for g in opt.param_groups)


def test_lr_schedule_at_chosen_steps():
    peak = peak_lr(1.0, 512)
    assert peak == 2.0
    K, W, lo = 1000, 50, 1e-6
    assert lr_at(0, K, W, peak, lo) == pytest.approx(0.02)  # base/100
    assert lr_at(25, K, W, peak, lo) == pytest.approx(0.02 + (2.0 - 0.02) * 0.5)
    assert lr_at(W, K, W, peak, lo) == pytest.approx(2.0)
    mid = W + (K - W) // 2  # cosine half way: the mean of peak and min
    assert lr_at(mid, K, W, peak, lo) == pytest.approx((2.0 + lo) / 2)
    k = 800
    assert lr_at(k, K, W, peak, lo) == pytest.approx(lo + (2.0 - lo) * 0.5 * (1 + math.cos(math.pi * 750 / 950)))
    assert lr_at(K, K, W, peak, lo) == pytest.approx(lo)
    assert peak_lr(0.3, 512, scale=False) == 0.3


def test_teacher_momentum_schedule():
    K = 400
    assert momentum_at(0, K, 0.99) == pytest.approx(0.99)
    assert momentum_at(200, K, 0.99) == pytest.approx(0.995)
    assert momentum_at(100, K, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
    assert momentum_at(K, K, 0.99) == pytest.approx(1.0)
