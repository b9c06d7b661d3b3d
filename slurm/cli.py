"""``python -m slurm {pretrain,transfer,status,collect}``: submit, chain, watch and summarise jobs.

    python -m slurm pretrain configs/pretrain/slotcon_coco_r50_800ep.yaml --nodes 4 --gpus-per-node 8 \\
        --partition gpu --time 4320 [--dry-run] [key=value ...]
    python -m slurm transfer runs/slotcon_coco_r50_800ep_12345 --tasks det,voc,cityscapes,ade20k \\
        --gpus-per-node 8 --data-root det=/data/coco --data-root voc=/data/VOCdevkit
    python -m slurm status runs/slotcon_coco_r50_800ep_12345
    python -m slurm collect runs/slotcon_coco_r50_800ep_12345
"""
from __future__ import annotations

import argparse
import sys

from slurm import registry
from slurm.options import add_resource_args, resources_from_args


def _pairs(items: list[str] | None, what: str, default_key: str | None = None) -> dict[str, str]:
    out: dict[str, str] = {}
    for it in items or []:
        if "=" in it and not it.startswith("/"):
            k, v = it.split("=", 1)
            out[k] = v
        elif default_key is not None:
            out[default_key] = it
        else:
            raise SystemExit(f"{what}: expected TASK=VALUE, got {it!r}")
    return out


def _wait(job, rec: dict, poll_s: float = 10.0) -> None:
    """Block until the job is over (scontrol-based: submitit's sacct watcher is blind without accounting)."""
    import time

    from slurm.state import is_final, job_state

    while not is_final(job_state(rec)["state"]):
        time.sleep(poll_s)
    job.results()  # raises the job's own error if it failed


def cmd_pretrain(a: argparse.Namespace) -> int:
    from slurm.launch import submit_pretrain

    r = resources_from_args(a)
    res = submit_pretrain(a.config, a.overrides, r, output_root=a.output_root, run_dir=a.run_dir,
                          dry_run=a.dry_run)
    if a.wait and res.get("job") is not None:
        _wait(res["job"], registry.jobs_of(res["run_dir"], "pretrain")[-1])
        print("finished:", res["run_dir"])
    return 0


def cmd_transfer(a: argparse.Namespace) -> int:
    from slurm.transfer import TASKS, submit_transfer

    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    roots = _pairs(a.data_root, "--data-root", default_key="*")
    if "*" in roots:  # one root for every task
        roots = {t: roots.get(t, roots["*"]) for t in TASKS}
    configs = _pairs(a.task_config, "--task-config")
    opts: dict[str, list[str]] = {}
    for it in a.opt or []:
        k, v = it.split("=", 1) if "=" in it else ("", it)
        if k not in TASKS:
            raise SystemExit(f"--opt: expected TASK=ARG with TASK in {sorted(TASKS)}, got {it!r}")
        opts.setdefault(k, []).extend(v.split())
    r = resources_from_args(a)
    subs = submit_transfer(a.source, tasks, r, after=a.after, data_root=roots, configs=configs, opts=opts)
    failed = 0
    if a.wait:
        for s in subs:
            try:
                _wait(s["job"], s)
                print(f"{s['extra']['task']}: done -> {s['extra']['metrics']}")
            except Exception as e:  # noqa: BLE001 - report every task, then fail
                failed += 1
                errs = [x.strip() for x in str(e).splitlines() if "Error:" in x] or [str(e)]
                print(f"{s['extra']['task']}: FAILED (job {s['job_id']}): {errs[-1]}\n  logs: {s['logs'][0]}",
                      file=sys.stderr)
    return 1 if failed else 0


def cmd_status(a: argparse.Namespace) -> int:
    from slurm.state import job_state

    data = registry.load(a.run_dir)
    rows = [("kind", "task", "job", "state", "reason", "restarts", "dependency", "nodes")]
    for j in data.get("jobs", []):
        st = job_state(j)
        rows.append((j["kind"], j["extra"].get("task", "-"), j["job_id"], st["state"], st["reason"] or "-",
                     st["restarts"] or "-", j.get("dependency") or "-", st["nodes"] or "-"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_collect(a: argparse.Namespace) -> int:
    from slurm.collect import collect

    md, _ = collect(a.run_dir)
    print(md, end="")
    print(f"(written {a.run_dir}/results.md and results.json)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m slurm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    pp = sub.add_parser("pretrain", help="submit a (multi-node) pretraining job")
    pp.add_argument("config", help="configs/pretrain/*.yaml")
    pp.add_argument("overrides", nargs="*", metavar="key=value")
    add_resource_args(pp, time_min=1440)
    pp.add_argument("--output-root", default="runs", help="run dirs are <output-root>/<name>_<jobid>")
    pp.add_argument("--run-dir", default=None, help="continue an existing run dir (resumes its checkpoints)")
    pp.add_argument("--dry-run", action="store_true", help="print the sbatch script and resolved config only")
    pp.add_argument("--wait", action="store_true", help="block until the job has finished")
    pp.set_defaults(func=cmd_pretrain)

    pt = sub.add_parser("transfer", help="convert the backbone and submit transfer jobs (afterok the pretraining)")
    pt.add_argument("source", help="run directory (newest checkpoint) or a checkpoint file")
    pt.add_argument("--tasks", default="det,voc,cityscapes,ade20k", help="comma list of det,voc,cityscapes,ade20k,convert")
    pt.add_argument("--after", default=None, help="job id to wait for (default: the run's unfinished pretraining job; 'none': no wait)")
    pt.add_argument("--data-root", action="append", help="DIR for every task, or TASK=DIR (repeatable)")
    pt.add_argument("--task-config", action="append", help="TASK=CONFIG to replace a task's default config")
    pt.add_argument("--opt", action="append", help="TASK='ARGS' extra arguments for a task's entry point")
    pt.add_argument("--wait", action="store_true")
    add_resource_args(pt, time_min=1440)
    pt.set_defaults(func=cmd_transfer)

    ps = sub.add_parser("status", help="state of every job of a run")
    ps.add_argument("run_dir")
    ps.set_defaults(func=cmd_status)

    pc = sub.add_parser("collect", help="results table next to SlotCon's published numbers")
    pc.add_argument("run_dir")
    pc.set_defaults(func=cmd_collect)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    # key=value overrides may follow the options (`... --dry-run optim.base_lr=0.5`)
    a, extra = p.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x or a.cmd != "pretrain"]
    if stray:
        p.error(f"unrecognized arguments: {' '.join(stray)}")
    if a.cmd == "pretrain":
        a.overrides = [*a.overrides, *extra]
    try:
        return a.func(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
