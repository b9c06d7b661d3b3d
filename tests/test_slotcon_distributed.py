"""Two gloo ranks with batch B each == one process with batch 2B (loss, gradients, centre).

BN layers are put in eval mode for the comparison: with batch statistics the two set-ups differ by
design (per-rank BN). Everything else (gathered negatives with rank offsets, all-reduced centre,
global normalisation of the slot loss) must make the results identical.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pretrain.losses import active_mask, concat_all_gather
from pretrain.methods import ModelConfig, build_method
from pretrain.engine.distributed import free_port

B, S, WORLD = 3, 64, 2


def _cfg() -> ModelConfig:
    return ModelConfig(arch="resnet18", num_prototypes=6, dim_hidden=32, dim_out=16)


def _full_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    n = B * WORLD
    lo = torch.rand(n, 2, generator=g) * 0.4
    hi = 0.6 + torch.rand(n, 2, generator=g) * 0.4
    return {
        "view1": torch.randn(n, 3, S, S, generator=g),
        "view2": torch.randn(n, 3, S, S, generator=g),
        "box1": torch.cat([lo, hi], 1),
        "box2": torch.cat([1 - hi[:, :1], lo[:, 1:], 1 - lo[:, :1], hi[:, 1:]], 1),
        "flip1": torch.rand(n, generator=g) < 0.5,
        "flip2": torch.rand(n, generator=g) < 0.5,
    }


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = build_method(_cfg())
    with torch.no_grad():
        m.center.copy_(torch.linspace(-0.1, 0.2, 6))
        # Distinct student/teacher weights, so that teacher and student masks differ.
        m.update_teacher(0.0)
        for p in m.teacher_prototypes.parameters():
            p.add_(0.3 * torch.randn_like(p))
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.eval()
    return m


def _step(m: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, torch.Tensor], int]:
    with torch.no_grad():  # the number of student queries of direction 1 (for the test's premise)
        ls = m.prototypes(m.projector(m.encoder(batch["view1"])))[1]
        lt = m.teacher_prototypes(m.teacher_projector(m.teacher_encoder(batch["view2"])))[1]
        queries = int((active_mask(ls) & active_mask(lt)).sum())
    out = m(batch)
    out["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in out.items()}, grads, queries


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        gathered = concat_all_gather(torch.full((2,), float(rank)))
        assert gathered.tolist() == [0.0, 0.0, 1.0, 1.0]
        m = _model()
        full = _full_batch()
        batch = {k: v[rank * B:(rank + 1) * B] for k, v in full.items()}
        scalars, grads, queries = _step(m, batch)
        # What DDP does: average gradients (and we average the reported losses) over ranks.
        for g in grads.values():
            dist.all_reduce(g)
            g /= WORLD
        vals = torch.tensor([scalars["loss"], scalars["loss_group"], scalars["loss_slot"]])
        dist.all_reduce(vals)
        counts = concat_all_gather(torch.tensor([queries]))
        if rank == 0:
            torch.save({"vals": vals / WORLD, "grads": grads, "center": m.center.clone(), "counts": counts},
                       Path(out_dir) / "dist.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_with_double_batch(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    res = torch.load(tmp_path / "dist.pt", weights_only=True)
    # Premise: the ranks contrast different numbers of slots, so a plain per-rank mean would differ.
    assert res["counts"][0] != res["counts"][1], res["counts"]

    m = _model()
    scalars, grads, _ = _step(m, _full_batch())
    expected = torch.tensor([scalars["loss"], scalars["loss_group"], scalars["loss_slot"]])
    assert torch.allclose(res["vals"], expected, rtol=1e-5, atol=1e-6), (res["vals"], expected)
    assert torch.allclose(res["center"], m.center, atol=1e-6)
    assert set(res["grads"]) == set(grads)
    assert not any(n.startswith("teacher_") for n in grads)
    for name, g in grads.items():
        assert torch.allclose(res["grads"][name], g, rtol=1e-4, atol=1e-6), name
