"""Distributed setup: one code path for a single process, torchrun, SLURM (srun) and submitit.

Environment read, in order of precedence:
- torchrun / submitit (``TorchDistributedEnvironment().export()``): ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
- plain ``srun``: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; ``MASTER_ADDR`` is the
  first host of ``SLURM_JOB_NODELIST`` (resolved to its ``NodeAddr`` through ``scontrol`` when
  available) and ``MASTER_PORT`` is derived from the job id unless set.
NCCL on GPU, gloo on CPU. SyncBN only where it can run (CUDA and world size > 1): it raises on
CPU as soon as a process group exists (DESIGN.md).

Each process uses one GPU of those it can see: ``LOCAL_RANK`` modulo the visible count, so a node
whose tasks each see all its GPUs (torchrun, plain srun) and a cluster that gives each task only
its own GPU (``--gpus-per-task=1``, ``CUDA_VISIBLE_DEVICES`` per task) both work.

The process group's collectives time out after ``PRETRAIN_DIST_TIMEOUT_S`` seconds (environment,
default :data:`DEFAULT_DIST_TIMEOUT_S` = 600): when one rank dies or hangs, the others raise
instead of waiting forever in their next collective, and the job ends (under SLURM the launcher's
``srun --kill-on-bad-exit=1`` then stops every task). Raise it for steps that legitimately keep
ranks apart for longer (a first ``torch.compile`` on a slow node, a huge checkpoint on slow disks).
"""
from __future__ import annotations

import logging
import math
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("pretrain")

DIST_TIMEOUT_ENV = "PRETRAIN_DIST_TIMEOUT_S"
# Long enough for the slowest legitimate wait between ranks (rank 0 writing a ResNet-50 checkpoint,
# building a loader, compiling), short enough that a dead rank frees the allocation within minutes.
DEFAULT_DIST_TIMEOUT_S = 600.0


@dataclass
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM nodelist such as ``gpu[01-03,07],cpu1`` into host names.

    Uses ``scontrol show hostnames`` when available (exact SLURM semantics), else a parser for
    the common ``prefix[a-b,c]`` form.
    """
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=20, check=True).stdout.split()
            if out:
                return out
        except (subprocess.SubprocessError, OSError):
            pass
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            if "-" in part:
                a, b = part.split("-")
                hosts.extend(f"{prefix}{i:0{len(a)}d}" for i in range(int(a), int(b) + 1))
            else:
                hosts.append(prefix + part)
    return hosts


def _node_addr(host: str) -> str:
    """``NodeAddr`` of a SLURM node (differs from its name on loopback test clusters)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "node", host], capture_output=True, text=True,
                                 timeout=20, check=True).stdout
            m = re.search(r"NodeAddr=(\S+)", out)
            if m:
                return m.group(1)
        except (subprocess.SubprocessError, OSError):
            pass
    return host


def export_slurm_env(environ: dict | None = None) -> None:
    """Fill the torchrun variables from SLURM's when only the latter are set (``srun python -m pretrain``)."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise RuntimeError("SLURM task without SLURM_JOB_NODELIST: cannot find MASTER_ADDR; set it")
        env["MASTER_ADDR"] = _node_addr(expand_nodelist(nodelist)[0])
    if "MASTER_PORT" not in env:
        env["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)


def free_port() -> int:
    """A TCP port free on this host now, for a single-node rendezvous (local multi-process runs, tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_timeout(environ: dict | None = None) -> timedelta:
    """The process group's collective timeout: ``PRETRAIN_DIST_TIMEOUT_S`` seconds, else 600 s.

    Raises:
        ValueError: the variable is set but not a finite number of seconds > 0.
    """
    env = os.environ if environ is None else environ
    raw = env.get(DIST_TIMEOUT_ENV, "").strip()
    if not raw:
        return timedelta(seconds=DEFAULT_DIST_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{DIST_TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0")
    return timedelta(seconds=seconds)


def cuda_ordinal(local_rank: int) -> int:
    """The CUDA device index of this process among the GPUs it can see.

    ``LOCAL_RANK`` numbers the tasks of a node, not the GPUs this process sees: where each task is
    given only its own GPU, every task sees one device, index 0, whatever its local rank.
    """
    n = torch.cuda.device_count()
    if n < 1:
        raise RuntimeError("CUDA is available but no CUDA device is visible (CUDA_VISIBLE_DEVICES?)")
    return local_rank % n


def select_device(pref: str, local_rank: int) -> torch.device:
    """``auto``: a visible GPU (:func:`cuda_ordinal`) when CUDA is available, else the CPU."""
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but CUDA is not available")
        index = cuda_ordinal(local_rank)
        if index != local_rank:
            log.info("local rank %d uses cuda:%d (%d visible GPU(s))", local_rank, index, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_distributed(device_pref: str = "auto") -> DistEnv:
    """Initialise the process group from the environment (no-op for a single process)."""
    export_slurm_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_pref, local_rank)
    if world > 1 and not dist.is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise RuntimeError(f"distributed run (WORLD_SIZE={world}) without {key} in the environment")
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                                timeout=dist_timeout(), **kwargs)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def cleanup() -> None:
    """Destroy the process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """The global batch split evenly over ranks; a clear error when it does not divide."""
    if global_batch % world_size:
        raise ValueError(f"optim.batch_size={global_batch} is not divisible by the world size {world_size}; "
                         f"choose a multiple of {world_size}")
    return global_batch // world_size


def maybe_sync_bn(model: nn.Module, env: DistEnv) -> nn.Module:
    """SyncBN where it can run (CUDA, world > 1); plain BN otherwise."""
    if env.distributed and env.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max) when a process group exists; returns ``t``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank (a picklable value such as a path; itself in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)  # NCCL: through the current CUDA device, set by select_device
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


__all__ = ["DistEnv", "DIST_TIMEOUT_ENV", "DEFAULT_DIST_TIMEOUT_S", "expand_nodelist", "export_slurm_env",
           "free_port", "dist_timeout", "cuda_ordinal", "select_device", "init_distributed", "cleanup",
           "per_rank_batch", "maybe_sync_bn", "all_reduce", "broadcast_object", "barrier"]
