"""Job states without accounting: `scontrol`/`squeue` first, `sacct` if present, then submitit's files.

`sacct` needs slurmdbd; many test clusters (and ours) run with accounting off, where submitit's
own watcher only sees UNKNOWN. `scontrol show job` knows every job for `MinJobAge` after it ended.
"""
from __future__ import annotations

import os
import pickle
import re
import subprocess
from pathlib import Path

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED", "FINISHED", "INTERRUPTED"}


def _run(argv: list[str]) -> str | None:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


def scontrol_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job -o ID` as a dict (empty when SLURM does not know the job, or is absent)."""
    out = _run(["scontrol", "show", "job", "-o", str(job_id)])
    if not out:
        return {}
    line = out.strip().splitlines()[0]
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))


def slurm_state(job_id: str) -> dict[str, str]:
    """``{"state", "reason", "restarts", "nodes", "elapsed"}`` for a SLURM job ("UNKNOWN" state if nobody knows)."""
    f = scontrol_fields(job_id)
    if f:
        return {"state": f.get("JobState", "UNKNOWN"), "reason": f.get("Reason", ""),
                "restarts": f.get("Restarts", "0"), "nodes": f.get("NodeList", ""), "elapsed": f.get("RunTime", "")}
    out = _run(["squeue", "-h", "-j", str(job_id), "-o", "%T|%r|%N|%M"])
    if out and out.strip():
        state, reason, nodes, elapsed = (out.strip().splitlines()[0].split("|") + ["", "", "", ""])[:4]
        return {"state": state, "reason": reason, "restarts": "", "nodes": nodes, "elapsed": elapsed}
    out = _run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State,NodeList,Elapsed"])
    if out and out.strip():
        state, nodes, elapsed = (out.strip().splitlines()[0].split("|") + ["", "", ""])[:3]
        return {"state": state.split()[0], "reason": "", "restarts": "", "nodes": nodes, "elapsed": elapsed}
    return {"state": "UNKNOWN", "reason": "", "restarts": "", "nodes": "", "elapsed": ""}


def result_of(folder: str | Path, job_id: str, task: int = 0) -> tuple[str, object] | None:
    """submitit's ``(outcome, result)`` for a task, or None while it has not written one."""
    path = Path(folder) / f"{job_id}_{task}_result.pkl"
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception as e:  # noqa: BLE001 - a half-written or foreign pickle is reported, not fatal
        return ("error", f"unreadable result {path}: {e}")


def job_state(rec: dict) -> dict[str, str]:
    """State of a `jobs.json` record, whatever the cluster it ran on."""
    res = result_of(rec["submitit_folder"], rec["job_id"])
    if rec.get("cluster") == "slurm":
        st = slurm_state(rec["job_id"])
        if st["state"] == "UNKNOWN" and res is not None:
            st["state"] = "COMPLETED" if res[0] == "success" else "FAILED"
    else:  # local: the job id is the controller's pid
        alive = False
        try:
            os.kill(int(rec["job_id"]), 0)
            alive = True
        except (ValueError, OSError):
            pass
        state = "RUNNING" if alive and res is None else (
            "COMPLETED" if res and res[0] == "success" else "FAILED" if res else "UNKNOWN")
        st = {"state": state, "reason": "", "restarts": "", "nodes": "localhost", "elapsed": ""}
    st["result"] = "" if res is None else res[0]
    return st


def is_final(state: str) -> bool:
    return state.split()[0].upper() in FINAL
