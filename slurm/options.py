"""Resources of a job and their translation into submitit/SLURM parameters.

One :class:`Resources` describes what a job asks the scheduler for. :func:`executor_kwargs`
turns it into `submitit.AutoExecutor` parameters (generic ones plus ``slurm_``-prefixed ones),
and :func:`sbatch_parameters` into the native `sbatch` parameters the same executor would use,
so the dry run prints exactly the script a submission would write.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

CLUSTERS = ("slurm", "local", "debug")
SRUN_ARGS = ("--kill-on-bad-exit=1",)  # submitit's srun line of every job (see executor_kwargs)


@dataclass
class Resources:
    """Scheduler request of one job (one task per GPU; CPU-only jobs give ``tasks_per_node``)."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # only without GPUs (CPU test clusters); else = gpus_per_node
    cpus_per_task: int | None = None  # default: 8 with GPUs (data loading), 1 without
    mem_per_gpu: int | None = None  # GB
    time_min: int = 1440
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    cluster: str = "slurm"
    max_requeues: int = 10
    signal_delay_s: int = 120  # USR2 this long before the time limit: room for the checkpoint
    job_name: str = ""  # "" -> the run name (pretraining) or "transfer-<task>"
    dependency: str | None = None  # e.g. "afterok:123"
    task_per_node: bool = False  # one task per node that starts its own per-GPU processes (Detectron2's launch)
    extra: dict = field(default_factory=dict)  # further `#SBATCH --key=value`

    def __post_init__(self) -> None:
        if self.cluster not in CLUSTERS:
            raise ValueError(f"--cluster must be one of {CLUSTERS}, got {self.cluster!r}")
        if self.nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ValueError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if self.gpus_per_node > 0 and self.tasks_per_node not in (None, self.gpus_per_node):
            raise ValueError(f"--tasks-per-node={self.tasks_per_node} conflicts with --gpus-per-node="
                             f"{self.gpus_per_node}: jobs run one task per GPU")
        if self.cluster in ("local", "debug") and self.nodes != 1:
            raise ValueError(f"--cluster {self.cluster} runs on this machine only: use --nodes 1")
        if self.max_requeues < 0:
            raise ValueError(f"--max-requeues must be >= 0, got {self.max_requeues}")

    @property
    def ntasks_per_node(self) -> int:
        if self.task_per_node:
            return 1
        return self.gpus_per_node if self.gpus_per_node > 0 else (self.tasks_per_node or 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    @property
    def cpus(self) -> int:
        if self.cpus_per_task is not None:
            return self.cpus_per_task
        return 8 if self.gpus_per_node > 0 else 1


def executor_kwargs(r: Resources) -> dict:
    """`AutoExecutor.update_parameters` arguments for ``r`` (``slurm_`` ones apply on SLURM only)."""
    kw: dict = {
        "name": r.job_name or "submitit",
        "timeout_min": r.time_min,
        "nodes": r.nodes,
        "tasks_per_node": r.ntasks_per_node,
        "cpus_per_task": r.cpus,
        "slurm_signal_delay_s": r.signal_delay_s,
    }
    if r.gpus_per_node > 0:  # no GRES request at all on CPU clusters (they reject one)
        kw["gpus_per_node"] = r.gpus_per_node
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if getattr(r, key):
            kw[f"slurm_{key}"] = getattr(r, key)
    if r.mem_per_gpu:
        kw["slurm_mem_per_gpu"] = f"{r.mem_per_gpu}G"
    additional = {"requeue": True, **r.extra}  # allow `scontrol requeue` even where the site default is --no-requeue
    if r.dependency:
        additional["dependency"] = r.dependency
    kw["slurm_additional_parameters"] = additional
    # One task that exits with an error (a crash, an OOM kill) ends every task of the step at once:
    # without it the others wait in their next collective until the process-group timeout.
    kw["slurm_srun_args"] = list(SRUN_ARGS)
    return kw


def sbatch_parameters(r: Resources) -> dict:
    """Native `_make_sbatch_string` parameters equivalent to :func:`executor_kwargs` on SLURM."""
    from submitit.slurm.slurm import SlurmExecutor  # local import: submitit is only needed here

    eq = SlurmExecutor._equivalence_dict()
    out = {}
    for k, v in executor_kwargs(r).items():
        if k.startswith("slurm_"):
            out[k[len("slurm_"):]] = v
        else:
            out[eq.get(k, k)] = v  # type: ignore[call-overload]
    return out


def add_resource_args(p: argparse.ArgumentParser, *, time_min: int) -> None:
    """The scheduler options shared by `pretrain` and `transfer`."""
    g = p.add_argument_group("resources")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=0, help="one task per GPU; 0 on CPU clusters")
    g.add_argument("--tasks-per-node", type=int, default=None, help="tasks per node without GPUs (CPU/gloo)")
    g.add_argument("--cpus-per-task", type=int, default=None)
    g.add_argument("--mem-per-gpu", type=int, default=None, help="GB")
    g.add_argument("--time", type=int, default=time_min, help="minutes")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint")
    g.add_argument("--exclude")
    g.add_argument("--cluster", default="slurm", choices=CLUSTERS)
    g.add_argument("--max-requeues", type=int, default=10, help="preemption/time-limit requeues before giving up")
    g.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit at which SLURM sends USR2 (checkpoint time)")
    g.add_argument("--job-name", default="", help="default: the run name (pretrain), transfer-<task> (transfer)")


def resources_from_args(a: argparse.Namespace, dependency: str | None = None) -> Resources:
    return Resources(nodes=a.nodes, gpus_per_node=a.gpus_per_node, tasks_per_node=a.tasks_per_node,
                     cpus_per_task=a.cpus_per_task, mem_per_gpu=a.mem_per_gpu, time_min=a.time,
                     partition=a.partition, account=a.account, qos=a.qos, constraint=a.constraint,
                     exclude=a.exclude, cluster=a.cluster, max_requeues=a.max_requeues,
                     signal_delay_s=a.signal_delay, job_name=a.job_name, dependency=dependency)
