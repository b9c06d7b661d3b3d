"""Benchmark: one LARS step, per parameter (``foreach=False``) vs on whole lists (``torch._foreach_*``).

Both update the parameters of a torchvision ResNet (ResNet-18 by default: 62 tensors, 11.7 M
values) in the project's two groups (weights with decay + trust ratio; biases/BN with neither),
from the same gradients, side by side (interleaved, so machine noise hits both alike); the table
reports the median of ``--repeats`` runs of ``--steps`` steps each, per step. ``--device cuda``
times with CUDA synchronisation at the end of each run.

    python tools/bench_lars.py --out bench/lars.md
    python tools/bench_lars.py --arch resnet50 --device cuda --steps 50
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.bench_common import write_table  # noqa: E402

from pretrain.engine.optim import LARS, param_groups  # noqa: E402


def _model(arch: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    m = getattr(torchvision.models, arch)(weights=None).to(device)
    g = torch.Generator(device="cpu").manual_seed(1)
    for p in m.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(device)
    return m


def _time(opt: torch.optim.Optimizer, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / steps


def run(arch: str, device: torch.device, steps: int, repeats: int) -> dict[str, float]:
    """Median seconds per step of each implementation, and the largest parameter difference after."""
    a = _model(arch, device)
    b = copy.deepcopy(a)
    for pa, pb in zip(a.parameters(), b.parameters()):
        pb.grad = pa.grad.clone()
    opts = {"loop": LARS(param_groups(b, 1e-5), lr=0.1, momentum=0.9, foreach=False),
            "foreach": LARS(param_groups(a, 1e-5), lr=0.1, momentum=0.9, foreach=True)}
    for o in opts.values():  # warm-up: momentum buffers allocated, kernels loaded
        _time(o, 1, device)
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(repeats):
        for name, o in opts.items():
            times[name].append(_time(o, steps, device))
    diff = max(float((pa.detach() - pb.detach()).abs().max()) for pa, pb in zip(a.parameters(), b.parameters()))
    n_params = sum(1 for _ in a.parameters())
    n_values = sum(p.numel() for p in a.parameters())
    return {"loop": statistics.median(times["loop"]), "foreach": statistics.median(times["foreach"]),
            "max_abs_diff": diff, "tensors": n_params, "values": n_values}


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    load = f"; load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{what}; torch {torch.__version__}; {platform.platform()}{load}"


def main(argv: list[str] | None = None) -> int:
    """Time both implementations and write the Markdown table to ``--out``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10, help="steps per timed run")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per implementation (median)")
    p.add_argument("--out", default="bench/lars.md")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    r = run(a.arch, device, a.steps, a.repeats)
    argv_s = " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    lines = [
        f"Command: `python tools/bench_lars.py {argv_s}`  ",
        f"Machine: {_machine(device)}  ",
        f"{a.arch} parameters ({r['tensors']} tensors, {r['values'] / 1e6:.1f} M values), weight decay 1e-5, "
        f"median of {a.repeats} runs of {a.steps} steps, interleaved; parameters after all steps differ by at "
        f"most {r['max_abs_diff']:.1e}.",
        "",
        "| implementation | step (ms) | speed-up |",
        "|---|---|---|",
        f"| per-parameter loop (`foreach=False`, the CPU default) | {r['loop'] * 1e3:.2f} | 1.00x |",
        f"| `torch._foreach_*` (`foreach=True`, the CUDA default) | {r['foreach'] * 1e3:.2f} | {r['loop'] / r['foreach']:.2f}x |",
        "",
    ]
    write_table(a.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
