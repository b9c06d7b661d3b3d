"""Submitting jobs through `submitit.AutoExecutor` (SLURM, local processes, or in-process debug)."""
from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import submitit

from slurm import registry
from slurm.options import Resources, executor_kwargs, sbatch_parameters

SUBMITIT_DIR = "submitit"


def make_executor(folder: str | Path, r: Resources) -> submitit.AutoExecutor:
    """An executor for ``r``; its logs and pickles go to ``folder`` (``<jobid>_<rank>_log.out``)."""
    ex = submitit.AutoExecutor(folder=str(folder), cluster=r.cluster, slurm_max_num_timeout=r.max_requeues)
    kw = executor_kwargs(r)
    if r.cluster != "slurm":
        kw = {k: v for k, v in kw.items() if not k.startswith("slurm_")}
        if r.cluster == "debug":  # in-process: a single task, no GPUs to split
            kw.pop("tasks_per_node"), kw.pop("gpus_per_node", None)
    ex.update_parameters(**kw)
    return ex


def sbatch_script(folder: str | Path, r: Resources) -> str:
    """The sbatch script a submission of ``r`` would write (submitit's own generator; nothing is submitted)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = Path(folder).absolute()
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **sbatch_parameters(r))


def submit(ex: submitit.AutoExecutor, fn: Any) -> submitit.Job:
    """Submit ``fn`` (a callable without arguments), outside any surrounding SLURM/submitit env.

    `clean_env` hides the SLURM_*/SUBMITIT_*/RANK variables of a job we may be running in, so a
    chain submitted from inside a job does not inherit its allocation. ``SLURM_CONF`` (which
    cluster to talk to) is kept.
    """
    conf = os.environ.get("SLURM_CONF")
    with submitit.helpers.clean_env():
        if conf:
            os.environ["SLURM_CONF"] = conf
        return ex.submit(fn)


def link_logs(run_dir: Path, job: submitit.Job, num_tasks: int, prefix: str = "") -> None:
    """``run_dir/logs/<prefix>rank<k>.{out,err}`` -> submitit's per-rank logs (dangling until the job starts)."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for t in range(num_tasks):
        paths = submitit.core.utils.JobPaths(job.paths.folder, job_id=job.job_id, task_id=t)
        for ext, target in (("out", paths.stdout), ("err", paths.stderr)):
            link = logs / f"{prefix}rank{t}.{ext}"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)


def submit_pretrain(config: str, overrides: list[str], r: Resources, *, output_root: str | Path = "runs",
                    run_dir: str | Path | None = None, dry_run: bool = False, out=print) -> dict:
    """Validate the config, then submit a pretraining job (or, with ``dry_run``, only print it).

    Returns ``{"job_id", "run_dir", "job", "tensorboard"}`` (``job`` is the submitit Job; absent on a dry run).
    """
    from pretrain.config import load_config, to_yaml

    from slurm.pretrain_job import PretrainJob

    cfg = load_config(config, overrides)  # a typo fails here, not hours later in the queue
    name = cfg.name
    if not r.job_name:
        r = dataclasses.replace(r, job_name=name)
    output_root = Path(output_root).absolute()
    folder = output_root / SUBMITIT_DIR
    job_fn = PretrainJob(config, overrides, str(output_root), name, r.max_requeues,
                         run_dir=str(run_dir) if run_dir else None)
    if dry_run:
        shown = Path(run_dir) if run_dir else output_root / f"{name}_<JOBID>"
        out(f"# sbatch script ({r.world_size} tasks on {r.nodes} node(s); cluster={r.cluster})")
        out(sbatch_script(folder, r))
        out(f"# resolved config (run dir: {shown})")
        out(to_yaml(load_config(config, [*overrides, f"train.run_dir={shown}"])))
        return {"job_id": None, "run_dir": str(shown), "tensorboard": f"tensorboard --logdir {shown}"}
    folder.mkdir(parents=True, exist_ok=True)
    ex = make_executor(folder, r)
    if r.cluster == "debug":  # in-process and synchronous: the job id is only known from inside
        job = submit(ex, job_fn)
        res = job.result()
        rd = Path(res["run_dir"])
    else:
        job = submit(ex, job_fn)
        rd = Path(run_dir) if run_dir else output_root / f"{name}_{job.job_id}"
        rd.mkdir(parents=True, exist_ok=True)
        link_logs(rd, job, r.world_size)
    registry.add_job(rd, kind="pretrain", job_id=job.job_id, name=name, cluster=r.cluster, submitit_folder=folder,
                     num_tasks=r.world_size, dependency=r.dependency,
                     extra={"config": str(Path(config).resolve()), "overrides": overrides,
                            "nodes": r.nodes, "tasks_per_node": r.ntasks_per_node,
                            "gpus_per_node": r.gpus_per_node, "max_requeues": r.max_requeues})
    tb = f"tensorboard --logdir {rd}"
    out(f"job id:   {job.job_id}")
    out(f"run dir:  {rd}")
    out(f"logs:     {rd / 'logs'}  (submitit: {folder}/{job.job_id}_<rank>_log.out)")
    out(f"watch:    {tb}")
    return {"job_id": job.job_id, "run_dir": str(rd), "job": job, "tensorboard": tb}
