"""``make bench``: run every benchmark and assemble BENCHMARKS.md from their tables (bench/*.md).

Each benchmark writes its own table with the command that made it; this script runs them one after
another (never in parallel: they share the cores) and concatenates the tables under headings.
Pass ``--quick`` for smaller sizes (a smoke check of the scripts, not numbers to quote).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SECTIONS = [
    ("SlotCon step overhead over its teacher-student baseline", "bench/slotcon_overhead.md",
     ["tools/bench_slotcon.py", "--configs", "resnet50:224:16,resnet18:96:32", "--steps", "5", "--warmup", "1",
      "--out", "bench/slotcon_overhead.md"],
     ["tools/bench_slotcon.py", "--configs", "resnet18:64:8", "--steps", "2", "--warmup", "1",
      "--dim-hidden", "256", "--dim-out", "64", "--num-prototypes", "16", "--out", "bench/slotcon_overhead.md"]),
    ("Loader: FFCV vs PIL, two views with boxes at 224", "bench/loader.md",
     ["tools/bench_loader.py", "--images", "512", "--repeats", "5", "--out", "bench/loader.md"],
     ["tools/bench_loader.py", "--images", "32", "--repeats", "1", "--out", "bench/loader.md"]),
    ("Two-rank DDP vs one rank (same per-rank batch) and peak memory per image", "bench/ddp_memory.md",
     ["tools/bench_ddp_memory.py", "--out", "bench/ddp_memory.md"],
     ["tools/bench_ddp_memory.py", "--steps", "2", "--warmup", "1", "--batch", "4", "--out", "bench/ddp_memory.md"]),
    ("LARS step: per-parameter loop vs `torch._foreach_*`", "bench/lars.md",
     ["tools/bench_lars.py", "--out", "bench/lars.md"],
     ["tools/bench_lars.py", "--steps", "1", "--repeats", "1", "--out", "bench/lars.md"]),
    ("Online evaluation vs one epoch of the CPU demo", "bench/online_eval.md",
     ["tools/bench_online_eval.py", "--epochs", "3", "--out", "bench/online_eval.md"],
     ["tools/bench_online_eval.py", "--epochs", "1", "--out", "bench/online_eval.md"]),
]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks (unless ``--assemble-only``) and write BENCHMARKS.md."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--assemble-only", action="store_true", help="only rebuild BENCHMARKS.md from bench/*.md")
    a = p.parse_args(argv)
    for title, _, full, quick in SECTIONS:
        if a.assemble_only:
            break
        cmd = [sys.executable, *(quick if a.quick else full)]
        print(f"==> {title}: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    parts = ["# Benchmarks", "",
             "Made by `make bench` (`tools/bench_all.py`); each table names the command and machine that made it.",
             "Times are medians measured side by side in one run; these machines are noisy, so compare ratios.", ""]
    for title, path, _, _ in SECTIONS:
        f = ROOT / path
        body = f.read_text().strip() if f.exists() else "_not run yet_"
        # Each table file may start with its own '# title'; the section heading replaces it.
        body = "\n".join(line for line in body.splitlines() if not line.startswith("# "))
        parts += [f"## {title}", "", body.strip(), ""]
    # Written by `make gpu-check` on a GPU machine (tools/gpu_check.py), not by this script.
    gpu = ROOT / "bench" / "gpu_check.md"
    parts += ["## Training throughput on one GPU (`make gpu-check`)", "",
              gpu.read_text().strip() if gpu.exists() else "_not run yet_", ""]
    demo = ROOT / "bench" / "demo.md"
    parts += ["## The CPU demo's wall time", "", demo.read_text().strip() if demo.exists() else "_not run yet_", ""]
    # Measured by hand, stage by stage, on a CPU without native bfloat16 (the table names its commands).
    avx2 = ROOT / "bench" / "demo_avx2.md"
    if avx2.exists():
        parts += ["## The CPU demo's stages on an AVX2-only CPU (float32)", "", avx2.read_text().strip(), ""]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
