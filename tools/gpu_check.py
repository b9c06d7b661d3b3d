"""``make gpu-check``: exercise every CUDA-only path of the project on one GPU (about 5 minutes).

Each check runs the project's own entry points (``pretrain.config.load_config`` with overrides,
``pretrain.train.run``, the loaders' augmentation functions) on toy scenes generated in a temporary
directory, and any error fails the whole script loudly (traceback, ``FAIL`` in the summary, exit 1);
a check whose hardware or package is missing is ``SKIP`` with the reason:

1. ``throughput``: SlotCon training steps of ResNet-50 at 224 px, batch 64, channels_last, in fp16
   (GradScaler), bf16 and fp32: images/s of the step (data wait excluded) and peak GPU memory,
   written as the GPU table of BENCHMARKS.md with the GPU's name (``--update-benchmarks``);
2. ``autocast``: similarities, logits and the losses stay float32 under CUDA autocast fp16 / bf16;
3. ``lars``: the ``torch._foreach_*`` LARS against the per-parameter loop on the GPU;
4. ``photometric``: the FFCV GPU photometric path against the CPU ones (torch and OpenCV) on the same
   images, TF32 on and off, inside ``torch.cuda.set_sync_debug_mode("error")`` (a host sync raises);
5. ``compile``: ``train.compile=true`` for a few steps;
6. ``resume``: 4 steps with a checkpoint at 2, then 2 + resume + 2, compared with the uninterrupted run;
7. ``ffcv``: the FFCV loader feeding the GPU (skipped when ``ffcv`` cannot be imported);
8. ``syncbn``: two processes on two GPUs (NCCL, SyncBN, DDP): a short training run, and a rank with no
   slot active in both views, which must not leave the other waiting (skipped with fewer GPUs).

``--cpu-dry-run`` runs the same sequence on the CPU at tiny sizes (ResNet-18, 64 px, batch 4, 2 steps;
fp16 skipped, bf16 through CPU autocast where the CPU computes bfloat16 natively, the sync check on
the ``meta`` device, ``torch.compile`` with the ``eager`` backend) so that the script cannot rot:
``tests/test_gpu_check.py`` runs it.

Usage::

    make gpu-check                                   # = python tools/gpu_check.py --update-benchmarks
    python tools/gpu_check.py --out-dir /tmp/gc      # results.json + gpu_table.md there, BENCHMARKS.md untouched
    python tools/gpu_check.py --only throughput,resume
    python tools/gpu_check.py --cpu-dry-run --out-dir /tmp/gc

On a machine without this project's virtual environment (an air-gapped GPU node with its own PyTorch
with CUDA and no package registry, where a checkout travels with little room for more): what pretraining imports beyond that image's
packages (numpy, scipy, Pillow, opencv, numba, PyYAML, tqdm are there) is ``omegaconf`` and its
``antlr4-python3-runtime``, both pure Python. Build them here, carry ``.whl`` and install there::

    pip wheel --no-deps -w .whl omegaconf==2.3.0 antlr4-python3-runtime==4.9.3     # here (.whl is ignored)
    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    python3 tools/gpu_check.py --out-dir $OUT                                         # there

FFCV (compiled against Debian's libjpeg-turbo/OpenCV) is not there: that check is skipped. The
GPU table comes back in ``$OUT/gpu_table.md``; paste it into BENCHMARKS.md's GPU section (or run
``make gpu-check`` on a machine where the checkout is yours to update).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BENCH_TABLE = ROOT / "bench" / "gpu_check.md"
BENCHMARKS = ROOT / "BENCHMARKS.md"
BENCH_SECTION = "## Training throughput on one GPU (`make gpu-check`)"
BUDGET_S = 300.0


class Skip(Exception):
    """A check that cannot run here (missing GPU count, package, hardware feature); not a failure."""


@dataclass
class Sizes:
    """What each check trains: the GPU sizes, or the tiny CPU ones of ``--cpu-dry-run``."""

    device: str
    arch: str
    image: int
    batch: int
    warmup_steps: int
    measured_steps: int
    small_arch: str  # compile / resume / ffcv / syncbn runs
    small_image: int
    small_batch: int
    num_workers: int
    photometric_batch: int

    @staticmethod
    def for_mode(dry_run: bool) -> Sizes:
        if dry_run:
            return Sizes("cpu", "resnet18", 64, 4, 1, 1, "resnet18", 64, 4, 0, 8)
        workers = max(2, min(12, (os.cpu_count() or 4) - 2))
        return Sizes("cuda", "resnet50", 224, 64, 3, 8, "resnet18", 112, 16, workers, 64)


@dataclass
class Context:
    """Shared state of one run of the checks."""

    sizes: Sizes
    dry_run: bool
    work: Path
    out_dir: Path
    toy_root: Path | None = None
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return torch.device(self.sizes.device)


# ---- shared helpers -----------------------------------------------------------------------------------
def toy_scenes(ctx: Context) -> Path:
    """Toy scenes at the check's image size (generated once per run, in the work directory)."""
    if ctx.toy_root is None:
        from pretrain.data.toy_scenes import make_toy_scenes

        ctx.toy_root = make_toy_scenes(ctx.work / "toy", n_train=_toy_n(ctx), n_val=2, size=ctx.sizes.image, seed=0)
    return ctx.toy_root


def _toy_n(ctx: Context) -> int:
    return max(2 * ctx.sizes.batch, 4 * ctx.sizes.small_batch)


def overrides(ctx: Context, name: str, *, arch: str, image: int, batch: int, steps: int, amp: str,
              **extra: Any) -> list[str]:
    """``key=value`` overrides of the COCO R50 paper config for a short toy-scenes run on this device."""
    s = ctx.sizes
    base: dict[str, Any] = {
        "name": name, "data.dataset": "toy", "data.root": str(toy_scenes(ctx)), "data.loader": "pil",
        "data.image_size": image, "data.toy_size": s.image, "data.toy_n_train": _toy_n(ctx), "data.toy_n_val": 2,
        "data.num_workers": s.num_workers,
        "model.arch": arch, "optim.batch_size": batch, "optim.warmup_epochs": 0, "train.epochs": 50,
        "train.max_steps": steps, "train.amp": amp, "train.channels_last": True, "train.device": s.device,
        "train.run_dir": str(ctx.work / "runs" / name), "train.checkpoint_every_steps": 0,
        "train.export_backbone": False, "log.every_steps": 1, "log.image_every_steps": 0,
        "log.progress_bar": False, "log.tensorboard": False,
    }
    if ctx.dry_run:
        base.update({"model.dim_hidden": 64, "model.dim_out": 32, "model.num_prototypes": 8})
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def train(ctx: Context, ovr: list[str], hooks: list | None = None):
    """``pretrain.train.run`` on the COCO R50 paper config with ``ovr`` (the run's result)."""
    from pretrain.config import load_config
    from pretrain.train import run

    cfg = load_config(ROOT / "configs" / "pretrain" / "slotcon_coco_r50_800ep.yaml", ovr)
    res = run(cfg, hooks or [])
    for row in res.history:
        if not math.isfinite(row["loss"]):
            raise RuntimeError(f"non-finite loss {row['loss']} at step {row['step']}")
    return res


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _hook_base():
    from pretrain.engine.hooks import HookBase

    return HookBase


def step_timer(device: torch.device):
    """A hook timing each step's compute (synchronised, data wait excluded) and the peak memory."""

    class StepTimer(_hook_base()):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.peak_bytes = 0
            self.method = None

        def before_train(self) -> None:
            self.method = self.trainer.method
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)

        def before_step(self) -> None:
            _sync(device)
            self._t0 = time.perf_counter()

        def after_step(self) -> None:
            _sync(device)
            self.times.append(time.perf_counter() - self._t0)
            if device.type == "cuda":
                self.peak_bytes = torch.cuda.max_memory_allocated(device)

    return StepTimer()


# ---- 1. throughput --------------------------------------------------------------------------------------
def check_throughput(ctx: Context) -> dict:
    """SlotCon R50 steps at 224 px / batch 64 with channels_last in fp16, bf16 and fp32."""
    from pretrain.engine.precision import cpu_has_native_bf16

    s = ctx.sizes
    rows = []
    for amp in ("fp16", "bf16", "none"):
        if ctx.dry_run and amp == "fp16":
            rows.append({"amp": amp, "skipped": "fp16 autocast with the GradScaler is a CUDA path"})
            continue
        if amp == "bf16" and ((ctx.dry_run and not cpu_has_native_bf16())
                              or (not ctx.dry_run and not torch.cuda.is_bf16_supported())):
            rows.append({"amp": amp, "skipped": "no native bfloat16 on this device"})
            continue
        timer = step_timer(ctx.device)
        steps = s.warmup_steps + s.measured_steps
        res = train(ctx, overrides(ctx, f"throughput_{amp}", arch=s.arch, image=s.image, batch=s.batch,
                                   steps=steps, amp=amp), [timer])
        if res.step != steps or len(timer.times) != steps:
            raise RuntimeError(f"amp={amp}: {res.step} steps run, {steps} asked")
        step_s = statistics.median(timer.times[s.warmup_steps:])
        rows.append({"amp": amp, "step_s": step_s, "images_per_s": s.batch / step_s,
                     "peak_mem_gib": timer.peak_bytes / 2**30, "loss_last": res.history[-1]["loss"]})
        print(f"  amp={amp}: {s.batch / step_s:.1f} images/s, step {step_s * 1e3:.1f} ms, "
              f"peak {timer.peak_bytes / 2**30:.2f} GiB", flush=True)
    table = throughput_table(ctx, rows)
    (ctx.out_dir / "gpu_table.md").write_text(table)
    return {"rows": rows, "table": table}


def device_name(ctx: Context) -> str:
    if ctx.device.type == "cuda":
        return torch.cuda.get_device_name(ctx.device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; dry run)"


def throughput_table(ctx: Context, rows: list[dict]) -> str:
    """The Markdown table of the throughput check, with the command and machine that made it."""
    s = ctx.sizes
    cuda = f", CUDA {torch.version.cuda}" if ctx.device.type == "cuda" else ""
    lines = [
        f"Command: `python tools/gpu_check.py{' --cpu-dry-run' if ctx.dry_run else ''}` (check `throughput`)  ",
        f"Machine: {device_name(ctx)}; torch {torch.__version__}{cuda}; {platform.platform()}  ",
        f"SlotCon ({s.arch}, heads 4096/256, K=256 as configs/pretrain/slotcon_coco_r50_800ep.yaml"
        f"{'; heads 64/32, K=8 in the dry run' if ctx.dry_run else ''}) on toy scenes at {s.image} px, batch {s.batch}, "
        f"channels_last, LARS; a step is both views through student and teacher, backward and the optimiser "
        f"(synchronised, data wait excluded); median of {s.measured_steps} steps after {s.warmup_steps} warm-up.",
        "",
        "| precision | images/s | step (ms) | peak memory (GiB) |",
        "|---|---|---|---|",
    ]
    names = {"fp16": "fp16 autocast + GradScaler", "bf16": "bf16 autocast", "none": "fp32"}
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {names[r['amp']]} | skipped: {r['skipped']} | | |")
        else:
            lines.append(f"| {names[r['amp']]} | {r['images_per_s']:.1f} | {r['step_s'] * 1e3:.1f} | "
                         f"{r['peak_mem_gib']:.2f} |")
    return "\n".join(lines) + "\n"


def update_benchmarks(table: str, path: Path = BENCHMARKS) -> None:
    """Replace (or append) the GPU section of BENCHMARKS.md with ``table``; other sections are kept."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{BENCH_SECTION}\n\n{table.strip()}\n"
    if BENCH_SECTION in text:
        head, rest = text.split(BENCH_SECTION, 1)
        nxt = rest.find("\n## ")
        tail = rest[nxt:] if nxt >= 0 else ""
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


# ---- 2. autocast ----------------------------------------------------------------------------------------
def check_autocast(ctx: Context) -> dict:
    """Similarities, logits, pooled updates and losses are float32 under autocast, whatever its dtype."""
    from pretrain.losses.object_losses import ctr_all_loss, ctr_img_loss, cossim_loss, match_slots
    from pretrain.models.grouping import pixel_slot_cosine
    from pretrain.models.prototypes import prototype_similarity
    from pretrain.models.query_slot_attention import QuerySlotAttention
    from pretrain.models.slot_attention import SlotAttention
    from pretrain.models.softargmax import SoftArgmaxPooling

    dev = ctx.device
    dtypes = [torch.bfloat16] if ctx.dry_run else [torch.float16, torch.bfloat16]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 6, 6, generator=g).to(dev)
    q = [torch.randn(2, 5, 16, generator=g).to(dev) for _ in range(4)]
    mods = [m.to(dev) for m in (SlotAttention(16, 5, iters=2), QuerySlotAttention(16, 5, iters=2),
                                SoftArgmaxPooling(16, 5))]
    out: dict[str, str] = {}
    for dt in dtypes:
        with torch.autocast(dev.type, dtype=dt):
            got = {
                "pixel_slot_cosine": pixel_slot_cosine(q[0], q[1], (1, 5)),
                "prototype_similarity": prototype_similarity(x, q[0][0]),
            }
            for m in mods:
                o = m(x, m.sample_noise(2, dev))
                got[f"{type(m).__name__}.logits"] = o.logits
                got[f"{type(m).__name__}.similarity"] = o.similarity
                got[f"{type(m).__name__}.slots"] = o.slots if not isinstance(m, SlotAttention) else o.slots.float()
            p12, p21 = match_slots(q[0], q[3]), match_slots(q[1], q[2])
            for fn in (ctr_all_loss, ctr_img_loss, cossim_loss):
                got[fn.__name__] = fn(*q, p12, p21, 0.1)
        bad = {k: str(v.dtype) for k, v in got.items() if v.dtype != torch.float32}
        if bad:
            raise AssertionError(f"under {dt} autocast these are not float32: {bad}")
        out[str(dt)] = "all float32"
    return out


# ---- 3. LARS ----------------------------------------------------------------------------------------------
def check_lars(ctx: Context) -> dict:
    """foreach LARS vs the per-parameter loop on this device (ResNet parameters, a few steps)."""
    from tools.bench_lars import run as bench_lars

    arch = "resnet18" if ctx.dry_run else "resnet50"
    r = bench_lars(arch, ctx.device, steps=2 if ctx.dry_run else 10, repeats=1 if ctx.dry_run else 5)
    # Fused norms on CUDA sum in another order than one vector_norm per tensor: equal to rounding.
    if not r["max_abs_diff"] < 1e-5:
        raise AssertionError(f"foreach LARS differs from the loop by {r['max_abs_diff']:.3g}")
    print(f"  {arch}: loop {r['loop'] * 1e3:.2f} ms, foreach {r['foreach'] * 1e3:.2f} ms per step, "
          f"max difference {r['max_abs_diff']:.1e}", flush=True)
    return r


# ---- 4. photometric --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _tf32(on: bool):
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


@contextlib.contextmanager
def no_host_sync(device: torch.device):
    """Any host synchronisation raises inside (CUDA's sync debug mode)."""
    if device.type != "cuda":
        yield
        return
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(prev)


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    d = (a.float().cpu() - b.float().cpu()).abs()
    return {"max": float(d.max()), "mean": float(d.mean()), "frac_gt_1e-3": float((d > 1e-3).float().mean())}


def check_photometric(ctx: Context) -> dict:
    """The GPU (batched torch) photometric path against the CPU paths, and free of host syncs."""
    from pretrain.data.config import DataConfig
    from pretrain.data.two_view import finish_views, finish_views_cpu

    n, size = ctx.sizes.photometric_batch, ctx.sizes.image
    cfg = DataConfig(image_size=size)
    crops = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    indices = list(range(n))
    raw = torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()
    flips = np.zeros(n, dtype=np.uint8)
    res: dict[str, Any] = {}
    for view in (0, 1):
        cpu_torch = finish_views(raw, cfg, 7, 1, indices, view)
        cpu_cv = np.empty((n, 3, size, size), np.float32)
        finish_views_cpu(crops, flips, cfg, 7, 1, indices, view, cpu_cv)
        cpu_cv = torch.from_numpy(cpu_cv)
        if ctx.dry_run:
            # The CPU stand-in for the sync check: on 'meta' any read of a device value raises.
            meta = finish_views(raw.to("meta"), cfg, 7, 1, indices, view)
            assert meta.shape == cpu_torch.shape
            res[f"view{view + 1}"] = {"torch_vs_opencv": _diff(cpu_torch, cpu_cv), "sync_check": "meta device"}
            continue
        dev_raw = raw.to(ctx.device)
        _sync(ctx.device)
        per_tf32 = {}
        for tf32 in (False, True):
            with _tf32(tf32):
                finish_views(dev_raw, cfg, 7, 1, indices, view)  # warm-up (cuDNN algorithm choice)
                _sync(ctx.device)
                with no_host_sync(ctx.device):
                    gpu = finish_views(dev_raw, cfg, 7, 1, indices, view)
                _sync(ctx.device)
            per_tf32[f"tf32_{'on' if tf32 else 'off'}"] = {"vs_cpu_torch": _diff(gpu, cpu_torch),
                                                           "vs_cpu_opencv": _diff(gpu, cpu_cv)}
        res[f"view{view + 1}"] = per_tf32
        off = per_tf32["tf32_off"]["vs_cpu_torch"]
        # Float rounding only, except pixels within rounding of the solarisation threshold (they flip).
        if not (off["mean"] < 1e-4 and off["frac_gt_1e-3"] < 1e-3):
            raise AssertionError(f"view {view + 1}: GPU photometric path differs from the CPU one: {off}")
    for k, v in res.items():
        print(f"  {k}: {json.dumps(v)}", flush=True)
    return res


# ---- 5. compile ---------------------------------------------------------------------------------------
def check_compile(ctx: Context) -> dict:
    """``train.compile=true`` for a few steps (the dry run traces with the ``eager`` backend)."""
    s = ctx.sizes
    steps = 2 if ctx.dry_run else 4
    amp = "none" if ctx.dry_run else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    ovr = overrides(ctx, "compile", arch=s.small_arch, image=s.small_image, batch=s.small_batch, steps=steps,
                    amp=amp, **{"train.compile": True})
    orig = torch.compile
    if ctx.dry_run:  # inductor's C++ codegen would take minutes on a small CPU; dynamo's tracing is the point
        torch.compile = functools.partial(orig, backend="eager")
    try:
        torch._dynamo.reset()
        t0 = time.perf_counter()
        res = train(ctx, ovr)
    finally:
        torch.compile = orig
        torch._dynamo.reset()
    if res.step != steps:
        raise RuntimeError(f"compiled run stopped at step {res.step} of {steps}")
    return {"steps": res.step, "seconds": time.perf_counter() - t0, "losses": [r["loss"] for r in res.history]}


# ---- 6. resume ------------------------------------------------------------------------------------------
def _final_weights():
    class Keep(_hook_base()):
        state: dict[str, torch.Tensor] = {}

        def after_train(self) -> None:
            self.state = {k: v.detach().float().cpu().clone() for k, v in self.trainer.method.state_dict().items()}

    return Keep()


def check_resume(ctx: Context) -> dict:
    """4 uninterrupted steps vs 2 steps, checkpoint, resume, 2 steps: same losses and weights."""
    s = ctx.sizes
    common = dict(arch=s.small_arch, image=s.small_image, batch=s.small_batch, amp="none")
    extra = {"train.deterministic": True, "train.checkpoint_every_steps": 2, "train.keep_last": 5}
    try:
        ref_keep = _final_weights()
        ref = train(ctx, overrides(ctx, "resume_ref", steps=4, **common, **extra), [ref_keep])
        first = train(ctx, overrides(ctx, "resume_cut", steps=2, **common, **extra))
        keep = _final_weights()
        second = train(ctx, overrides(ctx, "resume_cut", steps=4, **common, **extra), [keep])
    finally:
        torch.use_deterministic_algorithms(False)
    if first.step != 2 or second.step != 4 or [r["step"] for r in second.history] != [2, 3]:
        raise AssertionError(f"resume did not continue at step 2: {[r['step'] for r in second.history]}")
    ref_rows = {r["step"]: r for r in ref.history}
    loss_diff = max(abs(r["loss"] - ref_rows[r["step"]]["loss"]) / max(abs(ref_rows[r["step"]]["loss"]), 1e-12)
                    for r in first.history + second.history)
    w_diff = max(float((keep.state[k] - ref_keep.state[k]).abs().max()) for k in ref_keep.state)
    # The CPU is bit-exact; on a GPU a few kernels (RoIAlign's backward) add atomically.
    tol = 0.0 if ctx.dry_run else 1e-3
    if not (loss_diff <= tol and w_diff <= max(tol, 0.0)):
        raise AssertionError(f"resumed run differs from the uninterrupted one: loss rel {loss_diff:.3g}, "
                             f"weights {w_diff:.3g}")
    print(f"  losses rel. diff {loss_diff:.2e}, weights max diff {w_diff:.2e}", flush=True)
    return {"loss_rel_diff": loss_diff, "weight_max_diff": w_diff}


# ---- 7. FFCV --------------------------------------------------------------------------------------------
def check_ffcv(ctx: Context) -> dict:
    """The FFCV loader (``.beton`` of the toy scenes) feeding this device for a few steps."""
    try:
        import ffcv  # noqa: F401
    except Exception as e:  # compiled package: ImportError, or an OSError from a missing shared library
        raise Skip(f"ffcv cannot be imported here ({type(e).__name__}: {e})") from None
    from pretrain.data.datasets import dataset_files
    from pretrain.data.ffcv_writer import write_beton

    s = ctx.sizes
    beton = ctx.work / "toy.beton"
    if not beton.exists():
        write_beton(dataset_files("toy", toy_scenes(ctx)), beton, max_resolution=None, num_workers=2)

    class DeviceProbe(_hook_base()):
        devices: set[str] = set()

        def after_step(self) -> None:
            self.devices |= {str(v.device.type) for v in self.trainer.batch.values() if torch.is_tensor(v)}

    probe = DeviceProbe()
    res = train(ctx, overrides(ctx, "ffcv", arch=s.small_arch, image=s.small_image, batch=s.small_batch, steps=2,
                               amp="none", **{"data.loader": "ffcv", "data.ffcv_path": str(beton)}), [probe])
    if res.step != 2 or probe.devices != {ctx.device.type}:
        raise AssertionError(f"ffcv run: {res.step} steps, batch on {probe.devices}")
    return {"steps": res.step, "losses": [r["loss"] for r in res.history], "batch_devices": sorted(probe.devices)}


# ---- 8. SyncBN on two GPUs ------------------------------------------------------------------------------
def _syncbn_worker(rank: int, port: int, ovr: list[str], out: str) -> None:
    import torch.distributed as dist
    from torch import nn

    from pretrain.config import load_config
    from pretrain.losses.slot_contrast import slot_contrastive_loss
    from pretrain.models.heads import Predictor
    from pretrain.train import run

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), PRETRAIN_DIST_TIMEOUT_S="120")
    cfg = load_config(ROOT / "configs" / "pretrain" / "slotcon_coco_r50_800ep.yaml", ovr)
    res = run(cfg)  # NCCL, SyncBN (maybe_sync_bn), DDP, LARS
    # A rank without any slot active in both views must still run the SyncBN predictor.
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", rank=rank, world_size=2, timeout=timedelta(seconds=60), device_id=dev)
    try:
        torch.manual_seed(0)
        pred = nn.SyncBatchNorm.convert_sync_batchnorm(Predictor(16, 32, 16)).to(dev)
        model = nn.parallel.DistributedDataParallel(pred, device_ids=[rank])
        b, k = 4, 6
        g = torch.Generator().manual_seed(rank)
        slots = torch.randn(b, k, 16, generator=g).to(dev).requires_grad_()
        teach = torch.randn(b, k, 16, generator=g).to(dev)
        ms = torch.zeros(b, k, dtype=torch.bool, device=dev)
        mt = torch.zeros_like(ms)
        ms[:, 0] = True
        mt[:, 1 if rank == 0 else 0] = True  # rank 0: nothing in common
        for _ in range(2):
            loss = slot_contrastive_loss(slots, teach, ms, mt, model, 0.2)
            loss.backward()
        torch.cuda.synchronize(dev)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"train_steps": res.step, "loss": float(loss)}))
    finally:
        dist.destroy_process_group()


def check_syncbn(ctx: Context) -> dict:
    """Two processes, two GPUs: training with SyncBN, and the empty-selection predictor path."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if ctx.dry_run or n < 2:
        raise Skip(f"needs two GPUs ({n} visible); tests/test_syncbn_deadlock.py covers the CPU stand-in")
    import torch.multiprocessing as mp

    s = ctx.sizes
    ovr = overrides(ctx, "syncbn", arch=s.small_arch, image=s.small_image, batch=2 * s.small_batch, steps=3,
                    amp="bf16" if torch.cuda.is_bf16_supported() else "fp16")
    out = ctx.work / "syncbn"
    out.mkdir(exist_ok=True)
    from pretrain.engine.distributed import free_port

    mp.spawn(_syncbn_worker, args=(free_port(), ovr, str(out)), nprocs=2, join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    if any(r["train_steps"] != 3 for r in ranks):
        raise AssertionError(f"two-GPU run: {ranks}")
    return {"ranks": ranks}


# ---- driver -------------------------------------------------------------------------------------------
CHECKS: list[tuple[str, Callable[[Context], dict]]] = [
    ("throughput", check_throughput),
    ("autocast", check_autocast),
    ("lars", check_lars),
    ("photometric", check_photometric),
    ("compile", check_compile),
    ("resume", check_resume),
    ("ffcv", check_ffcv),
    ("syncbn", check_syncbn),
]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def run_checks(dry_run: bool, out_dir: Path, only: list[str] | None = None, skip: list[str] | None = None,
               update_bench: bool = False) -> int:
    """Run the checks in order; print a summary; return the exit code (1 if any check failed)."""
    names = [n for n, _ in CHECKS]
    for n in (only or []) + (skip or []):
        if n not in names:
            raise SystemExit(f"unknown check {n!r}; checks: {', '.join(names)}")
    if not dry_run and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here; run with --cpu-dry-run for the CPU sequence", file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = Sizes.for_mode(dry_run)
    summary: dict[str, dict] = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = Context(sizes=sizes, dry_run=dry_run, work=Path(tmp), out_dir=out_dir)
        print(f"gpu_check on {device_name(ctx)}; torch {torch.__version__}; sizes {asdict(sizes)}", flush=True)
        for name, fn in CHECKS:
            if (only and name not in only) or (skip and name in skip):
                continue
            print(f"==> {name}: {fn.__doc__.splitlines()[0]}", flush=True)
            t0 = time.perf_counter()
            try:
                result = fn(ctx)
                status, detail = "PASS", result
            except Skip as e:
                status, detail = "SKIP", str(e)
                print(f"  skipped: {e}", flush=True)
            except Exception as e:  # noqa: BLE001 - every failure is reported, then the next check runs
                status, detail = "FAIL", f"{type(e).__name__}: {e}"
                traceback.print_exc()
            summary[name] = {"status": status, "seconds": round(time.perf_counter() - t0, 1), "result": detail}
            print(f"  {status} ({summary[name]['seconds']} s)", flush=True)
    total = time.perf_counter() - t_all
    table = summary.get("throughput", {}).get("result", {})
    if update_bench and summary.get("throughput", {}).get("status") == "PASS" and not dry_run:
        BENCH_TABLE.parent.mkdir(parents=True, exist_ok=True)
        BENCH_TABLE.write_text(table["table"])
        update_benchmarks(table["table"])
        print(f"updated {BENCHMARKS} ({BENCH_SECTION[3:]})")
    (out_dir / "results.json").write_text(json.dumps(_jsonable({
        "device": device_name(ctx), "torch": torch.__version__, "dry_run": dry_run, "seconds": total,
        "checks": summary}), indent=1))
    print("\nsummary:")
    for name, r in summary.items():
        print(f"  {r['status']:4}  {name:12} {r['seconds']:7.1f} s")
    print(f"  total {total:.0f} s{' (over the 5-minute budget)' if total > BUDGET_S and not dry_run else ''}; "
          f"results in {out_dir / 'results.json'}")
    failed = [n for n, r in summary.items() if r["status"] == "FAIL"]
    if failed:
        print(f"gpu_check FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-dry-run", action="store_true", help="the same sequence on the CPU at tiny sizes")
    p.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "gpu_check")
    p.add_argument("--only", default="", help="comma-separated checks to run (default: all)")
    p.add_argument("--skip", default="", help="comma-separated checks to leave out")
    p.add_argument("--update-benchmarks", action="store_true",
                   help="write the throughput table into BENCHMARKS.md (GPU runs only)")
    a = p.parse_args(argv)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    return run_checks(a.cpu_dry_run, a.out_dir, split(a.only), split(a.skip), a.update_benchmarks)


if __name__ == "__main__":
    raise SystemExit(main())
