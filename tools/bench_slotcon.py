"""Benchmark: SlotCon training step vs a plain two-view teacher-student step.

Both steps share the same encoder + projector weights and the same EMA update. The baseline runs
student forward+backward and teacher forward on both views with a trivial dense cosine loss on the
projections; the SlotCon step adds prototypes, inverse augmentation, the grouping and slot losses
and the predictor. Steps are interleaved (side by side) and medians reported, as a Markdown table
printed and written to ``bench/slotcon_overhead.md``.

    python tools/bench_slotcon.py                                   # R50/224/16 and R18/96/32, CPU
    python tools/bench_slotcon.py --configs resnet18:64:8 --steps 3 --dim-hidden 256   # quick check
"""
from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.methods import ModelConfig, build_method  # noqa: E402


def _batch(n: int, size: int, device: torch.device, channels_last: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lo, hi = torch.rand(n, 2, generator=g) * 0.4, 0.6 + torch.rand(n, 2, generator=g) * 0.4
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    batch = {
        "view1": torch.randn(n, 3, size, size, generator=g).contiguous(memory_format=fmt),
        "view2": torch.randn(n, 3, size, size, generator=g).contiguous(memory_format=fmt),
        "box1": torch.cat([lo, hi], 1),
        "box2": torch.cat([1 - hi[:, :1], lo[:, 1:], 1 - lo[:, :1], hi[:, 1:]], 1),
        "flip1": torch.rand(n, generator=g) < 0.5,
        "flip2": torch.rand(n, generator=g) < 0.5,
    }
    return {k: v.to(device) for k, v in batch.items()}


def _slotcon_step(m, batch) -> None:
    m.update_teacher(0.99)
    m(batch)["loss"].backward()


def _baseline_step(m, batch) -> None:
    m.update_teacher(0.99)
    z1, z2 = m.projector(m.encoder(batch["view1"])), m.projector(m.encoder(batch["view2"]))
    with torch.no_grad():
        t1 = m.teacher_projector(m.teacher_encoder(batch["view1"]))
        t2 = m.teacher_projector(m.teacher_encoder(batch["view2"]))
    loss = -(F.normalize(z1.float(), dim=1) * F.normalize(t2.float(), dim=1)).sum(1).mean()
    loss = loss - (F.normalize(z2.float(), dim=1) * F.normalize(t1.float(), dim=1)).sum(1).mean()
    loss.backward()


def _timed(fn, m, batch, device: torch.device, amp: bool, cpu_timer: bool = False) -> float:
    m.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    # CPU time of this process is far less sensitive to other jobs on a shared machine than wall time.
    clock = time.process_time if cpu_timer else time.perf_counter
    t0 = clock()
    with torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16, enabled=amp):
        fn(m, batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - t0


def bench(arch: str, size: int, batch_size: int, args: argparse.Namespace, device: torch.device) -> dict:
    """Median step times (s) of baseline and SlotCon for one setting."""
    cfg = ModelConfig(arch=arch, num_prototypes=args.num_prototypes, dim_hidden=args.dim_hidden, dim_out=args.dim_out)
    torch.manual_seed(0)
    m = build_method(cfg).to(device)
    if args.channels_last:
        m = m.to(memory_format=torch.channels_last)
    batch = _batch(batch_size, size, device, args.channels_last)
    times = {"baseline": [], "slotcon": []}
    for i in range(args.warmup + args.steps):
        # Alternate the order so drift on a shared machine hits both equally.
        order = [("baseline", _baseline_step), ("slotcon", _slotcon_step)]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            t = _timed(fn, m, batch, device, args.amp, args.timer == "cpu")
            if i >= args.warmup:
                times[name].append(t)
    base, slot = statistics.median(times["baseline"]), statistics.median(times["slotcon"])
    return {"arch": arch, "size": size, "batch": batch_size, "baseline": base, "slotcon": slot}


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"{what}; torch {torch.__version__}; {platform.platform()}"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="resnet50:224:16,resnet18:96:32", help="arch:image_size:batch,...")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dim-hidden", type=int, default=4096)
    p.add_argument("--dim-out", type=int, default=256)
    p.add_argument("--num-prototypes", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="autocast (bf16 on CPU, fp16 on CUDA)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--timer", choices=["wall", "cpu"], default="wall",
                   help="wall clock, or this process's CPU time (steadier on a shared CPU machine)")
    p.add_argument("--out", default="bench/slotcon_overhead.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for spec in args.configs.split(","):
        try:
            arch, size, bs = spec.split(":")
            rows.append(bench(arch, int(size), int(bs), args, device))
        except ValueError as e:
            raise SystemExit(f"--configs: bad entry {spec!r} ({e}); expected arch:image_size:batch") from e
    cmd = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0] if argv is None else "tools/bench_slotcon.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        "# SlotCon step overhead vs a plain teacher-student step",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {_machine(device)}  ",
        f"Heads {args.dim_hidden}/{args.dim_out}, K={args.num_prototypes}, amp={args.amp}, "
        f"channels_last={args.channels_last}, timer={args.timer}; median of {args.steps} steps after {args.warmup} warm-up, interleaved.",
        "",
        "| arch | image | batch/view | baseline step (ms) | SlotCon step (ms) | overhead |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        over = 100.0 * (r["slotcon"] / r["baseline"] - 1.0)
        lines.append(f"| {r['arch']} | {r['size']} | {r['batch']} | {1e3 * r['baseline']:.1f} | "
                     f"{1e3 * r['slotcon']:.1f} | {over:+.1f}% |")
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    return table


if __name__ == "__main__":
    main()
