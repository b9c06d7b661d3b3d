"""What a multi-GPU job needs from the distributed setup, checked on the CPU.

- The CUDA device is one of those the process sees (``LOCAL_RANK`` modulo the visible count), so a
  cluster that gives each task only its own GPU does not ask for ``cuda:<local rank>``.
- ``init_process_group`` gets an explicit timeout (``PRETRAIN_DIST_TIMEOUT_S``, default 600 s): a
  dead rank makes the others fail instead of hanging.
- Every SLURM job's ``srun`` line carries ``--kill-on-bad-exit=1``: one failing task ends them all.
"""
from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from pretrain.engine import distributed as D


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA 'available' with a settable number of visible devices; records ``set_device``."""
    state = {"count": 1, "set": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["count"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: state["set"].append(i))
    return state


@pytest.mark.parametrize(("visible", "local_rank", "expected"), [
    (1, 0, 0), (1, 3, 0), (1, 7, 0),  # one GPU per task: always its cuda:0
    (8, 0, 0), (8, 5, 5),  # torchrun / srun with every GPU of the node visible
    (4, 6, 2),  # more local tasks than visible GPUs: wrap around the visible ones
])
def test_cuda_device_is_picked_among_the_visible_ones(fake_cuda, visible: int, local_rank: int,
                                                     expected: int) -> None:
    fake_cuda["count"] = visible
    for pref in ("auto", "cuda"):
        dev = D.select_device(pref, local_rank)
        assert dev == torch.device("cuda", expected)
    assert fake_cuda["set"] == [expected, expected]


def test_no_visible_gpu_and_cpu_choices(fake_cuda, monkeypatch) -> None:
    fake_cuda["count"] = 0
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        D.select_device("auto", 0)
    assert D.select_device("cpu", 3) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.select_device("auto", 3) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="not available"):
        D.select_device("cuda", 0)


def test_dist_timeout_from_the_environment() -> None:
    assert D.dist_timeout({}) == timedelta(seconds=600) == timedelta(seconds=D.DEFAULT_DIST_TIMEOUT_S)
    assert D.dist_timeout({"PRETRAIN_DIST_TIMEOUT_S": "45"}) == timedelta(seconds=45)
    assert D.dist_timeout({"PRETRAIN_DIST_TIMEOUT_S": " 1.5 "}) == timedelta(seconds=1.5)
    assert D.dist_timeout({"PRETRAIN_DIST_TIMEOUT_S": ""}) == timedelta(seconds=600)
    for bad in ("0", "-3", "ten", "nan", "inf"):
        with pytest.raises(ValueError, match="PRETRAIN_DIST_TIMEOUT_S"):
            D.dist_timeout({"PRETRAIN_DIST_TIMEOUT_S": bad})


def _init_with_env(monkeypatch, extra: dict[str, str]) -> dict:
    calls: list[dict] = []
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(D.dist, "init_process_group", lambda **kw: calls.append(kw))
    for k in ("SLURM_PROCID", "SLURM_NTASKS", D.DIST_TIMEOUT_ENV):
        monkeypatch.delenv(k, raising=False)
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999",
           **extra}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    res = D.init_distributed("cpu")
    assert res.rank == 1 and res.world_size == 2 and res.device == torch.device("cpu")
    assert len(calls) == 1
    return calls[0]


def test_init_process_group_gets_the_timeout(monkeypatch) -> None:
    kw = _init_with_env(monkeypatch, {})
    assert kw["backend"] == "gloo" and kw["timeout"] == timedelta(seconds=600)
    kw = _init_with_env(monkeypatch, {"PRETRAIN_DIST_TIMEOUT_S": "120"})
    assert kw["timeout"] == timedelta(seconds=120)


def test_init_on_cuda_uses_the_visible_device_for_nccl(monkeypatch, fake_cuda) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(D.dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.delenv(D.DIST_TIMEOUT_ENV, raising=False)
    for k, v in {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "5", "MASTER_ADDR": "h", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    res = D.init_distributed("auto")
    assert res.device == torch.device("cuda", 0) and res.local_rank == 5
    assert calls[0]["backend"] == "nccl" and calls[0]["device_id"] == torch.device("cuda", 0)
    assert calls[0]["timeout"] == timedelta(seconds=600)


def test_slurm_srun_line_kills_the_step_on_a_bad_exit(tmp_path) -> None:
    from slurm.launch import sbatch_script
    from slurm.options import Resources, executor_kwargs, sbatch_parameters

    for r in (Resources(nodes=2, gpus_per_node=8), Resources(nodes=1, tasks_per_node=2),
              Resources(nodes=2, gpus_per_node=8, task_per_node=True)):
        assert "--kill-on-bad-exit=1" in executor_kwargs(r)["slurm_srun_args"]
        assert "--kill-on-bad-exit=1" in sbatch_parameters(r)["srun_args"]
        srun = [line for line in sbatch_script(tmp_path, r).splitlines() if line.startswith("srun ")]
        assert len(srun) == 1 and "--kill-on-bad-exit=1" in srun[0].split(), srun
