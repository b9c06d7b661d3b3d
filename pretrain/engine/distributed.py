"""Distributed setup: one code path for a single process, torchrun, SLURM (srun) and submitit.

Environment read, in order of precedence:
- torchrun / submitit (``TorchDistributedEnvironment().export()``): ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
- plain ``srun``: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; ``MASTER_ADDR`` is the
  first host of ``SLURM_JOB_NODELIST`` (resolved to its ``NodeAddr`` through ``scontrol`` when
  available) and ``MASTER_PORT`` is derived from the job id unless set.
NCCL on GPU, gloo on CPU. SyncBN only where it can run (CUDA and world size > 1): it raises on
CPU as soon as a process group exists (DESIGN.md).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


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


def select_device(pref: str, local_rank: int) -> torch.device:
    """``auto``: the local GPU when CUDA is available, else CPU."""
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but CUDA is not available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
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
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world, **kwargs)
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


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


__all__ = ["DistEnv", "expand_nodelist", "export_slurm_env", "select_device", "init_distributed", "cleanup",
           "per_rank_batch", "maybe_sync_bn", "all_reduce", "barrier"]
