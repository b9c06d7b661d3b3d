"""Benchmark the pretraining loaders: images/s of the PIL path vs the FFCV path.

Two views with crop boxes at ``--size`` (224), over generated photo-like JPEGs of varied sizes,
with the full BYOL augmentations and with photometric augmentations off (decode + crops only).
Each path runs a warm-up epoch (worker start-up, numba compilation), then ``--repeats`` timed
epochs; the table reports the median. Writes a Markdown table to ``--out`` (bench/loader.md).

    python tools/bench_loader.py --images 512 --cores 2 --repeats 3
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (smooth shading, texture, edges, sensor noise), sides 240..800 px."""
    folder.mkdir(parents=True, exist_ok=True)
    done = sorted(folder.glob("*.jpg"))
    if len(done) >= n:
        return done[:n]
    rng = np.random.default_rng(seed)
    for k in range(n):
        w, h = int(rng.integers(320, 801)), int(rng.integers(240, 641))
        small = rng.random((h // 32 + 2, w // 32 + 2, 3))
        base = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
        mid = rng.random((h // 6 + 2, w // 6 + 2, 1))
        tex = np.asarray(Image.fromarray((mid[..., 0] * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR),
                         np.float32)[..., None]
        yy, xx = np.mgrid[0:h, 0:w]
        edges = 40.0 * (np.sin(xx / rng.uniform(5, 40) + yy / rng.uniform(5, 40)) > 0.3)[..., None]
        img = 0.6 * base + 0.3 * tex + edges + rng.normal(0, 8, (h, w, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{k:05d}.jpg",
                                                                     quality=int(rng.integers(80, 96)))
    return sorted(folder.glob("*.jpg"))[:n]


def time_epochs(loader, repeats: int) -> tuple[float, float, int]:
    """(warm-up seconds, median images/s over timed epochs, images per epoch)."""
    t0 = time.perf_counter()
    loader.set_epoch(0)
    n = sum(int(b["index"].numel()) for b in loader)
    warm = time.perf_counter() - t0
    rates = []
    for r in range(repeats):
        loader.set_epoch(r + 1)
        t = time.perf_counter()
        n = sum(int(b["index"].numel()) for b in loader)
        rates.append(n / (time.perf_counter() - t))
    return warm, statistics.median(rates), n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cores", type=int, default=2, help="CPU cores to pin to and workers per path")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default="/tmp/bench_loader")
    p.add_argument("--out", default="bench/loader.md")
    p.add_argument("--max-resolution", type=int, default=512, help=".beton longest side")
    a = p.parse_args(argv)

    if hasattr(os, "sched_setaffinity"):
        avail = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, set(avail[: a.cores]))
    import torch

    from pretrain.data import DataConfig, build_pretrain_loader
    from pretrain.data.datasets import dataset_files
    from pretrain.data.ffcv_writer import write_beton

    work = Path(a.workdir)
    make_photos(work / "photos", a.images)
    beton = work / f"photos_{a.images}_{a.max_resolution}.beton"
    if not beton.exists():
        write_beton(dataset_files("folder", work / "photos"), beton, max_resolution=a.max_resolution,
                    jpeg_quality=90, num_workers=a.cores)
    full = DataConfig(dataset="folder", root=str(work / "photos"), image_size=a.size, num_workers=a.cores,
                      ffcv_path=str(beton))
    geo = dataclasses.replace(full, color_jitter_p=0.0, grayscale_p=0.0, blur_p=[0.0, 0.0], solarize_p=[0.0, 0.0])
    rows, keep = [], []
    for aug_name, cfg in (("full BYOL", full), ("crops only", geo)):
        for path in ("pil", "ffcv"):
            # One torch thread per augmenting thread: PIL augments in `cores` worker processes,
            # FFCV in `cores` threads of the main process while numba threads decode.
            torch.set_num_threads(1)
            c = dataclasses.replace(cfg, loader=path)
            loader = build_pretrain_loader(c, a.batch_size, rank=0, world_size=1, seed=0, device=torch.device("cpu"))
            warm, rate, n = time_epochs(loader, a.repeats)
            rows.append((aug_name, path, rate, warm, n))
            print(f"{aug_name:10s} {path:4s}: {rate:7.1f} img/s (warm-up epoch {warm:.1f}s, {n} images/epoch)")
            keep.append(loader)  # deleting an FFCV loader trips a harmless numba finalizer error
    by = {(r[0], r[1]): r[2] for r in rows}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [
        "# Loader throughput: PIL path vs FFCV path",
        "",
        f"Command: `python tools/bench_loader.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        f"Machine: {cpu}, pinned to {a.cores} cores, no GPU (augmentations on CPU); "
        f"{platform.python_version()}, torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"load average at the end {os.getloadavg()[0]:.1f}.",
        "",
        f"{a.images} generated photo-like JPEGs (320-800 x 240-640 px); two views at {a.size} with crop boxes, "
        f"batch {a.batch_size}; .beton: JPEG q90, longest side {a.max_resolution}. "
        f"Median of {a.repeats} epochs after a warm-up epoch.",
        "",
        "Both paths augment on the CPU with the same OpenCV per-image implementation "
        "(pretrain/data/photometric_cpu.py): the PIL path in its DataLoader worker processes, the FFCV "
        "path on threads after the numba decoder. The FFCV gain is decoding each JPEG once (from a "
        "re-encoded, size-capped .beton) and cutting both views in compiled code.",
        "",
        "| augmentations | path | images/s | warm-up epoch (s) | FFCV / PIL |",
        "|---|---|---:|---:|---:|",
    ]
    for aug_name, path, rate, warm, _ in rows:
        ratio = f"{rate / by[(aug_name, 'pil')]:.2f}x" if path == "ffcv" else ""
        lines.append(f"| {aug_name} | {path} | {rate:.1f} | {warm:.1f} | {ratio} |")
    lines.append("")
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
