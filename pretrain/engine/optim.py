"""Optimisers for pretraining: LARS (Barlow Twins / SlotCon variant) and SGD, with param groups.

LARS (You et al., 2017) as used by Barlow Twins and SlotCon: for every parameter with more than
one dimension the update ``d = g + wd * w`` is scaled by the trust ratio
``eta * ||w|| / ||d||`` (1 where either norm is 0); parameters with one dimension (biases, BN
weights and biases) get neither weight decay nor the trust ratio, i.e. plain SGD with momentum.
The momentum buffer accumulates ``mu <- m * mu + d`` and ``w <- w - lr * mu``.

Own implementation rather than ``timm.optim.Lars``: timm's trust ratio divides by
``||g|| + wd * ||w||`` instead of ``||g + wd * w||``, so it is not the published update.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """LARS with per-group switches ``lars`` (trust ratio) and ``weight_decay``.

    Group options: ``lr``, ``weight_decay``, ``momentum``, ``eta``, ``lars`` (bool). Only
    primitives live in the groups, so ``state_dict()`` loads with ``torch.load(weights_only=True)``.

    Two implementations of the same update, bit-exact with each other on the CPU
    (``tests/test_lars_foreach.py``): ``torch._foreach_*`` ops on whole parameter lists, which on
    CUDA launch one kernel per op instead of about fourteen small kernels per parameter and read
    nothing back to the host (the trust ratios stay a device vector); and a loop over parameters,
    faster on the CPU, where each parameter's temporaries stay in cache (``tools/bench_lars.py``:
    BENCHMARKS.md). ``foreach=None`` picks by device: the lists on CUDA, the loop elsewhere.
    """

    def __init__(self, params: Iterable, lr: float = 0.0, weight_decay: float = 0.0,
                 momentum: float = 0.9, eta: float = 0.001, lars: bool = True, *, foreach: bool | None = None) -> None:
        if lr < 0 or weight_decay < 0 or momentum < 0 or eta <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, weight_decay={weight_decay}, momentum={momentum}, eta={eta}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars=lars))
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer API
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            # foreach kernels fuse only tensors of one device and dtype.
            buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for p in g["params"]:
                if p.grad is not None:
                    buckets.setdefault((p.device, p.dtype), []).append(p)
            for (device, _), params in buckets.items():
                use_lists = device.type == "cuda" if self.foreach is None else self.foreach
                (self._update if use_lists else self._update_each)(params, g)
        return loss

    def _update_each(self, params: list[torch.Tensor], g: dict) -> None:
        """:meth:`_update`, one parameter at a time."""
        for p in params:
            d = p.grad
            if g["weight_decay"] != 0:
                d = d.add(p, alpha=g["weight_decay"])
            if g["lars"]:
                w_norm = torch.linalg.vector_norm(p)
                d_norm = torch.linalg.vector_norm(d)
                one = torch.ones_like(w_norm)
                q = torch.where(w_norm > 0, torch.where(d_norm > 0, g["eta"] * w_norm / d_norm, one), one)
                d = d.mul(q)
            state = self.state[p]
            if "mu" not in state:
                state["mu"] = torch.zeros_like(p)
            state["mu"].mul_(g["momentum"]).add_(d)
            p.add_(state["mu"], alpha=-g["lr"])

    def _update(self, params: list[torch.Tensor], g: dict) -> None:
        """``d = g + wd·w``; ``d <- d · η‖w‖/‖d‖`` (LARS groups; 1 where a norm is 0);
        ``μ <- m·μ + d``; ``w <- w - lr·μ`` for parameters of one device and dtype."""
        mus = []
        for p in params:
            state = self.state[p]
            if "mu" not in state:
                state["mu"] = torch.zeros_like(p)
            mus.append(state["mu"])
        d = [p.grad for p in params]
        if g["weight_decay"] != 0:
            d = torch._foreach_add(d, params, alpha=g["weight_decay"])
        if g["lars"]:
            w_norm = torch.stack(torch._foreach_norm(params))
            d_norm = torch.stack(torch._foreach_norm(d))
            one = torch.ones_like(w_norm)
            q = torch.where(w_norm > 0, torch.where(d_norm > 0, g["eta"] * w_norm / d_norm, one), one)
            d = torch._foreach_mul(d, list(q.unbind(0)))  # out of place: never scale the .grad tensors
        torch._foreach_mul_(mus, g["momentum"])
        torch._foreach_add_(mus, d)
        torch._foreach_add_(params, mus, alpha=-g["lr"])


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: ``>1``-D weights (decay + trust ratio) and 1-D params (neither).

    Each group carries ``lars`` and ``weight_decay``; parameters that do not require grad
    (the EMA teacher) are left out.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars": True, "name": "weights"},
        {"params": no_decay, "weight_decay": 0.0, "lars": False, "name": "bias_bn"},
    ]


def build_optimizer(model: nn.Module, name: str, *, lr: float, weight_decay: float,
                    momentum: float, eta: float = 0.001) -> torch.optim.Optimizer:
    """``lars`` (SlotCon Sec. 4.1), ``sgd`` (momentum SGD) or ``adamw`` (DINO's optimiser, betas
    (momentum, 0.999)); 1-D params get no weight decay in every case."""
    groups = param_groups(model, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=eta)
    if name == "sgd":
        for g in groups:
            g.pop("lars")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        for g in groups:
            g.pop("lars")
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    raise ValueError(f"optim.name: unknown optimiser {name!r}; valid: lars, sgd, adamw")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every group (the schedule is per step)."""
    for g in optimizer.param_groups:
        g["lr"] = lr


__all__ = ["LARS", "param_groups", "build_optimizer", "set_lr"]
