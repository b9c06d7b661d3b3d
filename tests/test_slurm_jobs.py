"""Real SLURM on loopback (tests/slurm_cluster.py): multi-task and simulated multi-node pretraining,
preemption -> checkpoint -> requeue -> resume, and a transfer job chained with afterok.

The demo config at toy size (ResNet-18, 64 px toy scenes, 32 images, global batch 16, gloo on CPU).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from slurm import registry
from slurm.launch import submit_pretrain
from slurm.options import Resources
from slurm.state import slurm_state
from slurm.transfer import submit_transfer

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CONFIG = "configs/pretrain/demo_cpu.yaml"
STEPS_PER_EPOCH = 2  # 32 images / global batch 16


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    from pretrain.data.toy_scenes import make_toy_scenes

    root = tmp_path_factory.mktemp("toy")
    make_toy_scenes(root, 32, 4, size=64, seed=0)
    return root


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    # Jobs inherit the submitting environment: one BLAS/OpenMP thread per rank on a 2-core machine.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")


def overrides(toy_root: Path, epochs: int) -> list[str]:
    return [f"data.root={toy_root}", "data.toy_n_train=32", "data.toy_n_val=4", "data.toy_size=64",
            "optim.batch_size=16", f"train.epochs={epochs}", "train.device=cpu", "log.image_every_steps=0",
            "log.progress_bar=false", "train.checkpoint_every_steps=100", "train.export_backbone=true"]


def rank_rows(run_dir: Path, rank: int) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "ranks" / f"rank{rank}.jsonl").read_text().splitlines()]


def step_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "end" not in r]


def wait_final(job_id: str, timeout_s: float, on_pending=None) -> str:
    """Poll scontrol until the job is final (accounting is off: submitit's sacct watcher is blind)."""
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        st = slurm_state(job_id)
        if st["state"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return st["state"]
        if on_pending is not None and st["state"] == "PENDING":
            on_pending(st)
        time.sleep(1)
    raise TimeoutError(f"job {job_id} not finished after {timeout_s}s: {slurm_state(job_id)}")


def logs_of(run_dir: Path) -> str:
    out = []
    for p in sorted((run_dir / "logs").glob("*")):
        if p.exists():
            out.append(f"== {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-25:]))
    return "\n".join(out)


# --------------------------------------------------------------------------- 2 tasks + chain
@pytest.fixture(scope="module")
def chain(slurm_cluster, toy_root, tmp_path_factory):
    """A 2-task pretraining job and a transfer ('convert') job submitted afterok on it, at once."""
    os.environ["OMP_NUM_THREADS"] = "1"
    out = tmp_path_factory.mktemp("runs")
    r = Resources(nodes=1, tasks_per_node=2, time_min=10, signal_delay_s=30)
    pre = submit_pretrain(CONFIG, overrides(toy_root, epochs=2), r, output_root=out)
    run_dir = Path(pre["run_dir"])
    tr = submit_transfer(str(run_dir), ["convert"], Resources(nodes=1, time_min=10, job_name="transfer"))
    seen_pending = slurm_state(tr[0]["job_id"])  # right after submission: the pretraining job is not done
    pre_state = wait_final(pre["job_id"], 400)
    tr_state = wait_final(tr[0]["job_id"], 200)
    yield {"pre": pre, "run_dir": run_dir, "transfer": tr[0], "pre_state": pre_state, "tr_state": tr_state,
           "seen_pending": seen_pending}
    slurm_cluster.cancel_all()


def test_two_tasks_pretrain_same_steps(chain):
    run_dir = chain["run_dir"]
    assert chain["pre_state"] == "COMPLETED", logs_of(run_dir)
    results = chain["pre"]["job"].results()
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world_size"] == 2 and r["status"] == "finished" and r["step"] == 2 * STEPS_PER_EPOCH
               for r in results)
    r0, r1 = step_rows(rank_rows(run_dir, 0)), step_rows(rank_rows(run_dir, 1))
    assert [r["step"] for r in r0] == [r["step"] for r in r1] == list(range(2 * STEPS_PER_EPOCH))
    # The logged losses are all-reduced over the ranks: identical on both.
    assert [r["loss"] for r in r0] == [r["loss"] for r in r1]
    assert (run_dir / "checkpoints" / f"ckpt_{2 * STEPS_PER_EPOCH:08d}.pth").is_file()
    # The dry run prints exactly the script that submission wrote.
    from slurm.launch import sbatch_script

    folder = Path(registry.load(run_dir)["jobs"][0]["submitit_folder"])
    written = (folder / f"{chain['pre']['job_id']}_submission.sh").read_text()
    r = Resources(nodes=1, tasks_per_node=2, time_min=10, signal_delay_s=30, job_name="demo_cpu")
    assert sbatch_script(folder, r) == written
    jobs = registry.load(run_dir)["jobs"]
    assert [j["kind"] for j in jobs] == ["pretrain", "transfer"]
    assert jobs[0]["job_id"] == chain["pre"]["job_id"] and run_dir.name.endswith(f"_{jobs[0]['job_id']}")


def test_transfer_waits_for_pretraining_then_runs(chain):
    tr = chain["transfer"]
    assert tr["dependency"] == f"afterok:{chain['pre']['job_id']}"
    assert chain["seen_pending"]["state"] == "PENDING" and chain["seen_pending"]["reason"] == "Dependency"
    assert chain["tr_state"] == "COMPLETED", logs_of(chain["run_dir"])
    rec = tr["job"].result()
    assert rec["checkpoint"].endswith("teacher_backbone.pth")
    d2 = Path(rec["weights"]["det"])
    assert d2.is_file() and d2.stat().st_size > 1_000_000  # ResNet-18 weights, converted after pretraining
    # It started only after pretraining ended: its files are newer than the final checkpoint.
    final = chain["run_dir"] / "checkpoints" / f"ckpt_{2 * STEPS_PER_EPOCH:08d}.pth"
    assert d2.stat().st_mtime >= final.stat().st_mtime
    status = subprocess.run([os.sys.executable, "-m", "slurm", "status", str(chain["run_dir"])], capture_output=True,
                            text=True, check=True).stdout
    assert status.count("COMPLETED") == 2 and "convert" in status


# --------------------------------------------------------------------------- two simulated nodes
def test_two_nodes_four_ranks(slurm, toy_root, tmp_path):
    r = Resources(nodes=2, tasks_per_node=2, time_min=10, signal_delay_s=30)
    pre = submit_pretrain(CONFIG, overrides(toy_root, epochs=1), r, output_root=tmp_path)
    run_dir = Path(pre["run_dir"])
    assert wait_final(pre["job_id"], 400) == "COMPLETED", logs_of(run_dir)
    results = pre["job"].results()
    assert sorted(r["rank"] for r in results) == [0, 1, 2, 3]
    assert all(r["world_size"] == 4 and r["step"] == STEPS_PER_EPOCH for r in results)
    rows = [step_rows(rank_rows(run_dir, k)) for k in range(4)]
    assert all([r["step"] for r in rows[k]] == list(range(STEPS_PER_EPOCH)) for k in range(4))
    assert all([r["loss"] for r in rows[k]] == [r["loss"] for r in rows[0]] for k in range(4))
    # Ranks 2-3 really ran on the second (simulated) node.
    assert sorted((r["rank"], r["node"]) for r in results) == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert slurm_state(pre["job_id"])["nodes"] == "node[1-2]"


# --------------------------------------------------------------------------- preemption
def test_preempted_job_checkpoints_requeues_and_resumes(slurm, toy_root, tmp_path):
    """Interrupted twice, both ways SLURM interrupts a job, then finishes where an uninterrupted run does:

    1. USR2 to every task (what ``--signal=USR2@delay`` does before the time limit): all ranks stop
       after the same step, rank 0 checkpoints, the job requeues itself (``checkpoint()``);
    2. ``scontrol requeue`` (an admin, or preemption in REQUEUE mode): SIGTERM, checkpoint, SLURM requeues.
    """
    epochs = 3
    total = epochs * STEPS_PER_EPOCH
    r = Resources(nodes=1, tasks_per_node=2, time_min=10, signal_delay_s=30, max_requeues=2)
    pre = submit_pretrain(CONFIG, overrides(toy_root, epochs=epochs), r, output_root=tmp_path)
    job_id, run_dir = pre["job_id"], Path(pre["run_dir"])
    metrics = run_dir / "metrics.jsonl"

    def skip_requeue_delay(st):  # SLURM holds a requeued job ~2 min (BeginTime); start it now
        if st["reason"] == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)

    def wait_step(at_least: int) -> None:  # rank 0 logs one metrics line per optimiser step
        t0 = time.time()
        while True:
            rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
            if rows and rows[-1]["step"] >= at_least and slurm_state(job_id)["state"] == "RUNNING":
                return
            assert time.time() - t0 < 400, f"step {at_least} not reached: {slurm_state(job_id)}\n{logs_of(run_dir)}"
            skip_requeue_delay(slurm_state(job_id))
            time.sleep(0.5)

    wait_step(0)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    t0 = time.time()
    while slurm_state(job_id)["restarts"] != "1":
        assert time.time() - t0 < 300, f"not requeued after USR2: {slurm_state(job_id)}\n{logs_of(run_dir)}"
        time.sleep(0.5)
    first_stop = [r for r in rank_rows(run_dir, 0) if "end" in r][0]["step"]
    wait_step(first_stop)  # the requeued run is training again
    subprocess.run(["scontrol", "requeue", job_id], check=True)

    assert wait_final(job_id, 500, on_pending=skip_requeue_delay) == "COMPLETED", logs_of(run_dir)
    assert slurm_state(job_id)["restarts"] == "2"
    results = pre["job"].results()
    # Only the USR2 requeue goes through checkpoint() (counted against --max-requeues).
    assert all(r["step"] == total and r["requeues"] == 1 and r["status"] == "finished" for r in results)
    for k in range(2):
        rows = rank_rows(run_dir, k)
        ends = [r for r in rows if "end" in r]
        assert [e["end"] for e in ends] == ["preempted", "preempted", "finished"]
        stops = [e["step"] for e in ends[:2]]
        assert 0 < stops[0] < stops[1] < total  # interrupted mid-run, twice ...
        # ... and each run resumed right after the checkpointed step: no step lost or repeated.
        assert [r["step"] for r in step_rows(rows)] == list(range(total))
    assert rank_rows(run_dir, 0) == rank_rows(run_dir, 1)  # the ranks stopped at the same steps
    log = (run_dir / "log.txt").read_text()
    for stop in stops:  # auto-resume found each preemption checkpoint
        assert f"checkpoints/ckpt_{stop:08d}.pth: step {stop}" in log
    assert "stop requested (SIGUSR2" in log and "stop requested (SIGTERM)" in log


# --------------------------------------------------------------------------- a rank dies
def _rank_pid(job_id: str, rank: int) -> int | None:
    """The pid of a job's task ``rank`` (the loopback nodes run on this machine): the process whose
    environment names the job and the rank and whose parent does not (data workers inherit both)."""
    found: dict[int, int] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (p / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in kv)
            if "python" not in (p / "cmdline").read_bytes().decode(errors="replace"):
                continue
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(rank):
            found[int(p.name)] = ppid
    roots = [pid for pid, ppid in found.items() if ppid not in found]
    return roots[0] if len(roots) == 1 else None


def test_killed_rank_ends_the_whole_job_promptly(slurm, toy_root, tmp_path):
    """kill -9 of one rank (an OOM kill, a crashed node): srun's --kill-on-bad-exit ends the other task at
    once, instead of it waiting in its next collective for the process group's timeout (600 s)."""
    r = Resources(nodes=1, tasks_per_node=2, time_min=10, signal_delay_s=30)
    pre = submit_pretrain(CONFIG, overrides(toy_root, epochs=200), r, output_root=tmp_path)  # ~minutes of work
    job_id, run_dir = pre["job_id"], Path(pre["run_dir"])
    metrics = run_dir / "metrics.jsonl"
    t0 = time.time()
    while not (metrics.is_file() and metrics.read_text().strip()):  # both ranks are training
        assert time.time() - t0 < 300, f"no step logged: {slurm_state(job_id)}\n{logs_of(run_dir)}"
        time.sleep(0.5)
    pid = _rank_pid(job_id, 1)
    assert pid is not None, f"rank 1 of job {job_id} not found among this machine's processes"
    os.kill(pid, 9)
    t_kill = time.time()
    state = wait_final(job_id, 150)  # TimeoutError: the surviving rank kept the allocation
    ended_s = time.time() - t_kill
    print(f"\njob {job_id}: {state} {ended_s:.1f} s after kill -9 of rank 1")
    assert state == "FAILED", logs_of(run_dir)
    # srun names the task whose exit ended the step: rank 1 ("Killed"), or rank 0 when its collective saw the
    # closed connection first (gloo: "Connection closed by peer") and it exited before srun reaped rank 1
    logs = logs_of(run_dir)
    assert re.search(r"srun: error: node\d: task [01]: (Killed|Exited with exit code)", logs), logs
