"""The same entry points on submitit's local executor (`--cluster local`): 2 processes with gloo,
then the transfer chain (which waits for the local pretraining job: the local executor has no
SLURM dependencies)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from slurm import registry
from slurm.launch import submit_pretrain
from slurm.options import Resources
from slurm.state import job_state
from slurm.transfer import submit_transfer

pytestmark = pytest.mark.slow


def test_local_two_tasks_then_convert_chain(tmp_path, monkeypatch):
    from pretrain.data.toy_scenes import make_toy_scenes

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    toy = make_toy_scenes(tmp_path / "toy", 32, 4, size=64, seed=0)
    ov = [f"data.root={toy}", "data.toy_n_train=32", "data.toy_n_val=4", "data.toy_size=64", "optim.batch_size=16",
          "train.epochs=1", "train.device=cpu", "log.image_every_steps=0", "log.progress_bar=false"]
    r = Resources(cluster="local", tasks_per_node=2, time_min=10)
    pre = submit_pretrain("configs/pretrain/demo_cpu.yaml", ov, r, output_root=tmp_path / "runs")
    run_dir = Path(pre["run_dir"])
    assert run_dir.name == f"demo_cpu_{pre['job_id']}"  # named with the (local) job id
    # Submitted before pretraining ends: blocks until the local job has written its result.
    tr = submit_transfer(str(run_dir), ["convert"], Resources(cluster="local", time_min=10))
    results = pre["job"].results()
    assert sorted(x["rank"] for x in results) == [0, 1]
    assert all(x["world_size"] == 2 and x["step"] == 2 and x["status"] == "finished" for x in results)
    rows = [[json.loads(x) for x in (run_dir / "ranks" / f"rank{k}.jsonl").read_text().splitlines()] for k in (0, 1)]
    assert [x.get("step") for x in rows[0]] == [x.get("step") for x in rows[1]] == [0, 1, 2]
    rec = tr[0]["job"].result()
    assert Path(rec["weights"]["det"]).is_file()
    jobs = registry.load(run_dir)["jobs"]
    assert [j["kind"] for j in jobs] == ["pretrain", "transfer"]
    assert job_state(jobs[0])["state"] == "COMPLETED" and job_state(jobs[1])["state"] == "COMPLETED"
