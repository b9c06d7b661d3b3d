"""Benchmark: two-rank DDP (gloo, CPU) vs one rank at the same per-rank batch, and peak memory per image.

Each variant runs the real training step (``build_method`` + DDP + LARS, synthetic two-view batches, so
the loader is not measured here; ``tools/bench_loader.py`` measures it). Reports the median step time,
images/s, the two-rank scaling efficiency, and the peak resident memory a step adds, per image.
Writes a Markdown table to ``--out`` (bench/ddp_memory.md)::

    python tools/bench_ddp_memory.py --arch resnet18 --size 64 --batch 16 --steps 5
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.bench_common import write_table  # noqa: E402


def _batch(b: int, s: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    box = torch.tensor([[0.1, 0.1, 0.9, 0.9]]).repeat(b, 1)
    return {"view1": torch.randn(b, 3, s, s, generator=g), "view2": torch.randn(b, 3, s, s, generator=g),
            "box1": box, "box2": box.clone(), "flip1": torch.zeros(b, dtype=torch.bool),
            "flip2": torch.ones(b, dtype=torch.bool)}


def _worker(rank: int, world: int, port: int, a: argparse.Namespace, out: "mp.Queue") -> None:
    from pretrain.methods import build_method
    from pretrain.methods.config import ModelConfig

    torch.set_num_threads(a.threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    method = build_method(ModelConfig(arch=a.arch, num_prototypes=a.k, dim_hidden=a.dim_hidden, dim_out=a.dim_out))
    model = torch.nn.parallel.DistributedDataParallel(method) if world > 1 else method
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    batch = _batch(a.batch, a.size)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        method.update_teacher(0.99)
        loss = model(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if world > 1:
            dist.barrier()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.put((rank, statistics.median(times), (rss1 - rss0) / 1024.0))
    if world > 1:
        dist.destroy_process_group()


def _run(world: int, a: argparse.Namespace) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, world, port, a, q)) for r in range(world)]
    for p in procs:
        p.start()
    res = [q.get() for _ in procs]
    for p in procs:
        p.join()
    step = max(r[1] for r in res)
    mem = max(r[2] for r in res)
    return step, mem


def main(argv: list[str] | None = None) -> None:
    """Run both variants and write the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="per-rank batch")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--dim-hidden", type=int, default=1024)
    p.add_argument("--dim-out", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (1: one core per rank)")
    p.add_argument("--out", default="bench/ddp_memory.md")
    a = p.parse_args(argv)
    one, mem1 = _run(1, a)
    two, mem2 = _run(2, a)
    ips1, ips2 = a.batch / one, 2 * a.batch / two
    cmd = "python tools/bench_ddp_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"Command: `{cmd}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU, gloo; "
        f"{a.arch} at {a.size} px, {a.batch} images per rank and view, {a.threads} thread(s) per rank; median of {a.steps} steps.",
        "",
        "| ranks | step (s) | images/s | scaling vs 1 rank | peak RSS added per image (MiB) |",
        "|---|---|---|---|---|",
        f"| 1 | {one:.3f} | {ips1:.1f} | 1.00 | {mem1 / a.batch:.1f} |",
        f"| 2 | {two:.3f} | {ips2:.1f} | {ips2 / ips1:.2f} | {mem2 / a.batch:.1f} |",
        "",
    ]
    write_table(a.out, lines)


if __name__ == "__main__":
    main()
