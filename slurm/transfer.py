"""Transfer job chains: convert the pretrained teacher backbone, fine-tune and evaluate (SlotCon Sec. 4.2).

Each task is one submitit job that depends (``afterok``) on the pretraining job, so it waits in
the queue until pretraining has finished successfully (a requeued pretraining job keeps its
dependents waiting). Inside, the first task converts the newest checkpoint of the run
(``tools/convert_to_d2.py`` / ``tools/convert_to_mmseg.py``; the others wait for the file), then
runs the Detectron2 or MMSegmentation entry point (``python -m transfer.detection`` /
``python -m transfer.segmentation``), which writes its metrics JSON under
``RUN_DIR/transfer/<task>/``; `python -m slurm collect` reads them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import submitit

from slurm import registry
from slurm.distenv import export_distributed_env
from slurm.launch import SUBMITIT_DIR, link_logs, make_executor, submit
from slurm.options import Resources
from slurm.state import is_final, job_state

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class TaskSpec:
    """A downstream protocol: which family of entry point, its default config, its metrics."""

    family: str  # det | seg | convert
    config: str | None
    dataset: str


TASKS: dict[str, TaskSpec] = {
    # Mask R-CNN R50-FPN 1x, SyncBN, COCO train2017 -> val2017 (AP^b, AP^m)
    "det": TaskSpec("det", "configs/detection/mask_rcnn_R50_FPN_1x_syncbn.yaml", "coco"),
    # FCN on PASCAL VOC aug, Cityscapes, ADE20K (mIoU)
    "voc": TaskSpec("seg", "configs/segmentation/fcn_d6_r50-d16_513x513_30k_voc12aug.py", "voc"),
    "cityscapes": TaskSpec("seg", "configs/segmentation/fcn_d6_r50-d16_769x769_90k_cityscapes.py", "cityscapes"),
    "ade20k": TaskSpec("seg", "configs/segmentation/fcn_r50-d8_512x512_80k_ade20k.py", "ade20k"),
    # only convert the backbone to both formats (no fine-tuning)
    "convert": TaskSpec("convert", None, ""),
}
CONVERTERS = {"det": ("tools/convert_to_d2.py", "d2.pkl"), "seg": ("tools/convert_to_mmseg.py", "mmseg.pth")}


def resolve_checkpoint(src: str | Path) -> Path:
    """The weights to transfer: a file as given; in a run directory the exported teacher backbone,
    else the newest ``ckpt_*.pth`` (highest step) anywhere below it."""
    src = Path(src)
    if src.is_file():
        return src
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: neither a checkpoint file nor a run directory")
    exported = sorted(src.rglob("teacher_backbone.pth"))
    if exported:
        return exported[0]
    ckpts = sorted(src.rglob("ckpt_*.pth"), key=lambda p: (p.stem.split("_")[-1].zfill(12), p.stat().st_mtime))
    if not ckpts:
        raise FileNotFoundError(f"no teacher_backbone.pth or ckpt_*.pth under {src}: has pretraining finished?")
    return ckpts[-1]


def run_dir_of(src: str | Path) -> Path:
    src = Path(src).absolute()
    if src.is_dir():
        return src
    return src.parent.parent if src.parent.name == "checkpoints" else src.parent


def convert(family: str, ckpt: Path, out_dir: Path, *, wait_only: bool, timeout_s: float = 1800) -> Path:
    """Convert ``ckpt`` for ``family`` into ``out_dir`` once (atomic rename); other tasks wait for the file."""
    tool, suffix = CONVERTERS[family]
    out = out_dir / f"{ckpt.stem}.{suffix}"
    if wait_only:
        t0 = time.time()
        while not out.exists():
            if time.time() - t0 > timeout_s:
                raise TimeoutError(f"waited {timeout_s:.0f}s for {out} (converted by the first task)")
            time.sleep(2)
        return out
    if out.exists():
        return out
    if not (REPO / tool).is_file():
        raise FileNotFoundError(f"converter {REPO / tool} is missing: cannot prepare {family} weights")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp{Path(suffix).suffix}")
    subprocess.run([sys.executable, str(REPO / tool), str(ckpt), str(tmp)], check=True, cwd=REPO)
    os.replace(tmp, out)
    return out


class TransferJob(submitit.helpers.Checkpointable):
    """One downstream task of a run, in one submitit job (requeued on time limit, resumes itself)."""

    def __init__(self, task: str, source: str, run_dir: str, *, config: str | None = None,
                 data_root: str | None = None, opts: list[str] | None = None, gpus_per_node: int = 0) -> None:
        if task not in TASKS:
            raise ValueError(f"unknown transfer task {task!r}; known: {sorted(TASKS)}")
        self.task = task
        self.spec = TASKS[task]
        self.source = str(Path(source).absolute())
        self.run_dir = str(Path(run_dir).absolute())
        self.config = str((REPO / (config or self.spec.config)).resolve()) if (config or self.spec.config) else None
        self.data_root = data_root
        self.opts = list(opts or [])
        self.gpus_per_node = gpus_per_node
        self.resume = False

    @property
    def out_dir(self) -> Path:
        return Path(self.run_dir) / "transfer" / self.task

    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.json"

    def command(self, weights: Path, env: submitit.JobEnvironment) -> list[str]:
        """The entry-point command line of this task on this node/rank."""
        py = [sys.executable, "-m"]
        if self.spec.family == "det":
            cmd = py + ["transfer.detection", "--config", self.config, "--weights", str(weights),
                        "--output-dir", str(self.out_dir), "--num-gpus", str(max(1, self.gpus_per_node)),
                        "--num-machines", str(env.num_nodes), "--machine-rank", str(env.node)]
            if env.num_nodes > 1:
                cmd += ["--dist-url", f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"]
        else:
            launcher = "pytorch" if env.num_tasks > 1 else "none"
            cmd = py + ["transfer.segmentation", "--config", self.config, "--weights", str(weights),
                        "--launcher", launcher, "--work-dir", str(self.out_dir)]
        if self.data_root:
            cmd += ["--data-root", self.data_root]
        if self.resume:
            cmd += ["--resume"]
        return cmd + self.opts

    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        export_distributed_env()
        ckpt = resolve_checkpoint(self.source)
        weights_dir = Path(self.run_dir) / "transfer" / "weights"
        first = env.global_rank == 0
        if self.spec.family == "convert":
            made = {fam: str(convert(fam, ckpt, weights_dir, wait_only=not first)) for fam in CONVERTERS
                    if (REPO / CONVERTERS[fam][0]).is_file()}
            record = {"task": self.task, "checkpoint": str(ckpt), "weights": made}
            if first:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                self.metrics_path().write_text(json.dumps(record, indent=2))
            return record
        weights = convert(self.spec.family, ckpt, weights_dir, wait_only=not first)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        cmd = self.command(weights, env)
        print("running:", " ".join(cmd), flush=True)
        code = subprocess.call(cmd, cwd=REPO)
        if code != 0:
            raise RuntimeError(f"transfer task {self.task} exited with code {code}: {' '.join(cmd)}")
        return {"task": self.task, "checkpoint": str(ckpt), "weights": str(weights),
                "metrics": str(self.metrics_path()) if self.metrics_path().exists() else None}

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """On the time limit: requeue and let Detectron2/MMSegmentation resume from their own checkpoints."""
        self.resume = True
        return super().checkpoint(*args, **kwargs)


def pretrain_dependency(run_dir: Path, after: str | None) -> tuple[str | None, dict | None]:
    """The job to wait for: ``--after`` if given ("none": no wait), else the run's unfinished pretraining job.

    A pretraining job that ended unsuccessfully is an error: ``afterok`` would never be satisfied.
    """
    if after:
        return (None, None) if after.lower() == "none" else (after, None)
    if not (run_dir / registry.JOBS_FILE).is_file():
        return None, None
    pre = registry.jobs_of(run_dir, "pretrain")
    if not pre:
        return None, None
    rec = pre[-1]
    st = job_state(rec)["state"]
    if st.startswith("COMPLETED"):
        return None, rec
    if is_final(st):
        raise ValueError(f"pretraining job {rec['job_id']} of {run_dir} ended as {st}: its dependents would never "
                         "start. Resume it first, or pass --after none to transfer its newest checkpoint anyway")
    return rec["job_id"], rec


def wait_local(rec: dict, poll_s: float = 2.0) -> None:
    """Local executor has no dependencies: block until the pretraining job's result is written."""
    from slurm.state import result_of

    while True:
        res = result_of(rec["submitit_folder"], rec["job_id"])
        if res is not None:
            if res[0] != "success":
                raise RuntimeError(f"pretraining job {rec['job_id']} failed; not starting the transfer jobs")
            return
        if job_state(rec)["state"] not in ("RUNNING", "UNKNOWN"):
            raise RuntimeError(f"pretraining job {rec['job_id']} ended without a result")
        time.sleep(poll_s)


def submit_transfer(source: str, tasks: list[str], r_base: Resources, *, after: str | None = None,
                    data_root: dict[str, str] | None = None, configs: dict[str, str] | None = None,
                    opts: dict[str, list[str]] | None = None, out=print) -> list[dict]:
    """Submit one job per task, each ``afterok`` the pretraining job; record them in ``RUN_DIR/jobs.json``."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown transfer task(s) {unknown}; known: {sorted(TASKS)}")
    run_dir = run_dir_of(source)
    dep_id, dep_rec = pretrain_dependency(run_dir, after)
    if dep_id and r_base.cluster != "slurm":
        if dep_rec is None:
            raise ValueError(f"--after {dep_id}: the {r_base.cluster} executor has no dependencies; "
                             "give the run directory of a local pretraining job instead")
        out(f"waiting for local pretraining job {dep_id} to finish ...")
        wait_local(dep_rec)
        dep_id = None
    folder = run_dir / SUBMITIT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    submitted = []
    for task in tasks:
        spec = TASKS[task]
        r = Resources(**{**r_base.__dict__, "job_name": f"{r_base.job_name or 'transfer'}-{task}",
                         "dependency": f"afterok:{dep_id}" if dep_id else None,
                         "task_per_node": spec.family == "det"})
        fn = TransferJob(task, source, str(run_dir), config=(configs or {}).get(task),
                         data_root=(data_root or {}).get(task), opts=(opts or {}).get(task),
                         gpus_per_node=r.gpus_per_node)
        job = submit(make_executor(folder, r), fn)
        link_logs(run_dir, job, r.world_size, prefix=f"{task}_")
        rec = registry.add_job(run_dir, kind="transfer", job_id=job.job_id, name=r.job_name, cluster=r.cluster,
                               submitit_folder=folder, num_tasks=r.world_size, dependency=r.dependency,
                               extra={"task": task, "family": spec.family, "dataset": spec.dataset,
                                      "config": fn.config, "metrics": str(fn.metrics_path())})
        out(f"{task:<11} job {job.job_id}" + (f" (afterok:{dep_id})" if dep_id else "") + f" -> {fn.out_dir}")
        rec["job"] = job
        submitted.append(rec)
    return submitted
