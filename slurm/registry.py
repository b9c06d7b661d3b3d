"""`jobs.json` in a run directory: every job submitted for that run (pretraining, transfer chain).

Layout::

    {"run_dir": "...", "cluster": "slurm", "submitit_folder": "...",
     "jobs": [{"kind": "pretrain", "job_id": "12", "name": "...", "submitted_at": "...",
               "dependency": null, "num_tasks": 4, "logs": [...], "extra": {...}}, ...]}

Written to a temporary file and renamed, so a reader never sees half a file.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

JOBS_FILE = "jobs.json"


def load(run_dir: str | Path) -> dict:
    """The registry of ``run_dir``; a clear error when the directory has none."""
    path = Path(run_dir) / JOBS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a run directory made by `python -m slurm`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def save(run_dir: str | Path, data: dict) -> Path:
    path = Path(run_dir) / JOBS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def add_job(run_dir: str | Path, *, kind: str, job_id: str, name: str, cluster: str, submitit_folder: str | Path,
            num_tasks: int, dependency: str | None = None, extra: dict | None = None) -> dict:
    """Append one submitted job (creating the registry on first use) and return its record."""
    path = Path(run_dir) / JOBS_FILE
    data = load(run_dir) if path.is_file() else {"run_dir": str(Path(run_dir).resolve()), "jobs": []}
    folder = Path(submitit_folder)
    rec = {
        "kind": kind,
        "job_id": str(job_id),
        "name": name,
        "cluster": cluster,
        "submitit_folder": str(folder),
        "submitted_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dependency": dependency,
        "num_tasks": num_tasks,
        "logs": [str(folder / f"{job_id}_{t}_log.out") for t in range(num_tasks)],
        "extra": extra or {},
    }
    data.setdefault("jobs", []).append(rec)
    save(run_dir, data)
    return rec


def jobs_of(run_dir: str | Path, kind: str | None = None) -> list[dict]:
    return [j for j in load(run_dir).get("jobs", []) if kind is None or j["kind"] == kind]
