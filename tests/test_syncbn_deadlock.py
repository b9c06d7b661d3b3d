"""Every rank runs the slot predictor every step, also one whose views share no active slot.

On CUDA with more than one rank the predictor's BNs are SyncBN: a collective in the forward pass
(all-gather of the statistics) and in the backward pass (all-reduce of the gradient sums). A rank
that skipped the predictor would leave the others waiting in that collective. On the CPU torch's
SyncBN refuses to run, so :class:`CollectiveBN` stands in for it: the same statistics over all
ranks through a differentiable all-reduce, i.e. a collective in forward and in backward, and a
zero-size batch takes part like any other (as torch's SyncBN does).

Two gloo ranks (a process-group timeout turns a deadlock into a failure) under DDP: rank 0 has no
slot active in both views. Both ranks must finish two steps, and the loss and the DDP-averaged
gradients must equal one process with the two ranks' batches concatenated.
"""
from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pretrain.losses.slot_contrast import slot_contrastive_loss
from pretrain.models.heads import Predictor
from pretrain.engine.distributed import free_port

B, K, D, H, WORLD = 3, 4, 8, 16, 2
TAU = 0.2
# A rank stuck in a collective fails after PG_TIMEOUT_S instead of hanging; the deadline is the last
# resort of the parent (both generous: the test machines are shared and slow to start processes).
PG_TIMEOUT_S = 60
TEST_DEADLINE_S = 900


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; its backward is the same collective on the gradients (as SyncBN's backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CollectiveBN(nn.Module):
    """Batch norm over the union of all ranks' batches via a differentiable all-reduce.

    A collective in forward (the statistics) and, through the all-reduce's backward, in backward:
    a rank whose loss does not depend on this layer's output never enters the backward collective,
    exactly as with torch's SyncBN. Running statistics are not tracked (not under test). Not an
    ``nn.SyncBatchNorm`` subclass: DDP refuses those on the CPU.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        n = x.new_full((1,), float(x.shape[0]))
        stats = torch.cat([x.sum(0), (x * x).sum(0), n])
        if dist.is_initialized() and dist.get_world_size() > 1:
            stats = _AllReduceSum.apply(stats)
        c = x.shape[1]
        count = stats[2 * c:].clamp(min=1.0)
        mean = stats[:c] / count
        var = stats[c:2 * c] / count - mean * mean
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


def _collective_predictor() -> nn.Module:
    torch.manual_seed(3)
    pred = Predictor(D, H, D)
    for i, m in enumerate(pred.mlp):
        if isinstance(m, nn.BatchNorm1d):
            new = CollectiveBN(m.num_features)
            with torch.no_grad():
                new.weight.copy_(1.0 + 0.1 * torch.randn(m.num_features))
                new.bias.copy_(0.1 * torch.randn(m.num_features))
            pred.mlp[i] = new
    return pred


class SlotHead(nn.Module):
    """Student slots (a learnt map of fixed inputs) and the predictor: SlotCon's two slot-loss directions."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.proj = nn.Parameter(torch.eye(D) + 0.1 * torch.randn(D, D))
        self.predictor = _collective_predictor()

    def forward(self, raw: torch.Tensor, slots_t: torch.Tensor, mask_s: torch.Tensor, mask_t: torch.Tensor,
                b: int) -> torch.Tensor:
        s = raw @ self.proj
        return (slot_contrastive_loss(s[:b], slots_t[b:], mask_s[:b], mask_t[b:], self.predictor, TAU)
                + slot_contrastive_loss(s[b:], slots_t[:b], mask_s[b:], mask_t[:b], self.predictor, TAU))


def _full_inputs() -> dict[str, torch.Tensor]:
    """Both views (view-major, like the method) of WORLD * B images; the first B images (rank 0)
    have no slot active in the student's view and the teacher's other view."""
    g = torch.Generator().manual_seed(0)
    n = WORLD * B
    raw = torch.randn(2, n, K, D, generator=g)
    slots_t = torch.randn(2, n, K, D, generator=g)
    mask_s = torch.rand(2, n, K, generator=g) < 0.7
    mask_t = torch.rand(2, n, K, generator=g) < 0.7
    mask_s[..., 0] = True  # every view has active slots (Eq. 5: some slot wins each pixel)
    mask_t[..., 1] = True
    mask_s[:, :B] = False
    mask_s[:, :B, 0] = True  # rank 0: students only slot 0, teachers never slot 0
    mask_t[:, :B, 0] = False
    return {"raw": raw, "slots_t": slots_t, "mask_s": mask_s, "mask_t": mask_t}


def _rank_inputs(full: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    return {k: v[:, rank * B:(rank + 1) * B].flatten(0, 1) for k, v in full.items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=PG_TIMEOUT_S))
    try:
        head = SlotHead()
        model = nn.parallel.DistributedDataParallel(head)
        x = _rank_inputs(_full_inputs(), rank)
        common = int((x["mask_s"][:B] & x["mask_t"][B:]).sum() + (x["mask_s"][B:] & x["mask_t"][:B]).sum())
        losses = []
        grads = None
        for step in range(2):  # a second step: DDP complains if the first left a gradient bucket unreduced
            model.zero_grad(set_to_none=True)
            loss = model(x["raw"], x["slots_t"], x["mask_s"], x["mask_t"], B)
            loss.backward()
            losses.append(loss.detach().clone())
            if step == 0:
                grads = {n: p.grad.detach().clone() for n, p in head.named_parameters()}
        mean_loss = torch.stack(losses)
        dist.all_reduce(mean_loss)
        counts = [torch.zeros(1, dtype=torch.long) for _ in range(WORLD)]
        dist.all_gather(counts, torch.tensor([common]))
        if rank == 0:
            torch.save({"loss": mean_loss / WORLD, "grads": grads, "common": torch.cat(counts)},
                       Path(out_dir) / "dist.pt")
    finally:
        dist.destroy_process_group()


def _spawn_with_deadline(out_dir: Path) -> None:
    ctx = mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TEST_DEADLINE_S
    while not ctx.join(timeout=1.0):
        alive = [p for p in ctx.processes if p.is_alive()]
        if alive and time.monotonic() > deadline:
            for p in alive:
                p.kill()
            pytest.fail(f"ranks still running after {TEST_DEADLINE_S} s: a collective deadlock")


def test_rank_without_common_slots_runs_the_predictor_and_matches_one_process(tmp_path: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _spawn_with_deadline(tmp_path)
    res = torch.load(tmp_path / "dist.pt", weights_only=True)
    assert res["common"].tolist()[0] == 0 and res["common"].tolist()[1] > 0, res["common"]

    head = SlotHead()
    full = {k: v.flatten(0, 1) for k, v in _full_inputs().items()}
    ref = head(full["raw"], full["slots_t"], full["mask_s"], full["mask_t"], WORLD * B)
    ref.backward()
    assert float(ref) > 0
    torch.testing.assert_close(res["loss"][0], ref.detach(), rtol=1e-5, atol=1e-6)
    for name, p in head.named_parameters():
        torch.testing.assert_close(res["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_no_common_slot_anywhere_is_a_zero_loss_with_every_parameter_in_the_graph() -> None:
    """In one process (plain BN) an empty selection gives 0 and gradients (zeros) for every parameter,
    which DDP needs to find each parameter used."""
    torch.manual_seed(0)
    pred = Predictor(D, H, D)
    s = torch.randn(B, K, D, requires_grad=True)
    mask = torch.zeros(B, K, dtype=torch.bool)
    mask[:, 0] = True
    other = torch.zeros(B, K, dtype=torch.bool)
    other[:, 1] = True
    loss = slot_contrastive_loss(s, torch.randn(B, K, D), mask, other, pred, TAU)
    loss.backward()
    assert float(loss) == 0.0
    assert s.grad is not None and float(s.grad.abs().sum()) == 0.0
    assert all(p.grad is not None and float(p.grad.abs().sum()) == 0.0 for p in pred.parameters())
    bn = [m for m in pred.modules() if isinstance(m, nn.BatchNorm1d)]
    assert all(float(m.running_mean.abs().sum()) == 0.0 and bool(torch.all(m.running_var == 1)) for m in bn)
