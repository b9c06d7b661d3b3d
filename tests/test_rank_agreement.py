"""Decisions every rank must share are agreed, never taken per rank (two gloo ranks on the CPU).

A rank that raised alone would leave the others waiting in the step's collective until the process
group's timeout; a rank that resumed another checkpoint would train from other weights. Each test
makes the condition true on rank 1 only. ``PRETRAIN_DIST_TIMEOUT_S`` is short here, so a regression
ends as a failure within seconds instead of hanging the suite.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pretrain.config import load_config
from pretrain.data.loader_base import TooManyBadImages
from pretrain.engine import checkpoint as ckpt_io
from pretrain.engine.distributed import free_port
from pretrain.engine.hooks import HookBase
from pretrain.train import report_error, run
from tests._engine_common import make_toy, tiny_overrides


class BadImageOnRank1(HookBase):
    """Rank 1's loader meets an undecodable file in step 1's batch (data.max_bad_fraction=0 on every rank)."""

    def before_step(self) -> None:
        t = self.trainer
        if t.env.rank == 1 and t.step == 1:
            t.loader.tracker.update(torch.tensor([5]), torch.tensor([1]))  # sample 5 replaced file 4


def _worker(rank: int, port: int, overrides: list[str], out_dir: str, case: str, unreadable: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), PRETRAIN_DIST_TIMEOUT_S="30")
    if rank == 1 and unreadable:  # e.g. a node whose network file system does not show the file whole yet
        real = ckpt_io.load_checkpoint

        def load(path, *a, **k):
            if Path(path).name == unreadable:
                raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")
            return real(path, *a, **k)

        ckpt_io.load_checkpoint = load
    out: dict = {}
    try:
        res = run(load_config(None, overrides), [BadImageOnRank1()] if case == "bad_image" else [])
        out.update(status=res.status, steps=[h["step"] for h in res.history])
    except Exception as e:  # noqa: BLE001 - what each rank raised is the result
        out.update(error=type(e).__name__, message=str(e), exit_code=report_error(e))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))


def _spawn(overrides: list[str], out_dir: Path, case: str, unreadable: str = "") -> list[dict]:
    mp.spawn(_worker, args=(free_port(), overrides, str(out_dir), case, unreadable), nprocs=2, join=True)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy(tmp_path_factory.mktemp("toy"))


def test_bad_image_limit_on_one_rank_stops_every_rank_at_the_same_step(toy, tmp_path) -> None:
    overrides = tiny_overrides(toy, tmp_path / "run", **{"data.max_bad_fraction": 0.0, "train.max_steps": 3,
                                                         "train.checkpoint_every_steps": 1})
    r0, r1 = _spawn(overrides, tmp_path, "bad_image")
    assert r0["error"] == r1["error"] == TooManyBadImages.__name__
    assert r0["exit_code"] == r1["exit_code"] == 65
    assert "data.max_bad_fraction=0.0" in r1["message"] and "1 undecodable images" in r1["message"]
    assert "1 other rank(s)" in r0["message"]
    # step 1 raised before its update on both ranks: the newest checkpoint is step 1's (after step 0)
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path / "run" / "checkpoints")][0] == "ckpt_00000001.pth"


def test_ranks_resume_the_same_checkpoint_when_one_cannot_read_the_newest(toy, tmp_path) -> None:
    run_dir = tmp_path / "run"
    first = tiny_overrides(toy, run_dir, **{"train.max_steps": 3, "train.checkpoint_every_steps": 1})
    run(load_config(None, first))  # one process writes ckpt 1, 2, 3
    assert ckpt_io.list_checkpoints(run_dir / "checkpoints")[0].name == "ckpt_00000003.pth"
    again = tiny_overrides(toy, run_dir, **{"train.max_steps": 5, "train.checkpoint_every_steps": 1})
    r0, r1 = _spawn(again, tmp_path, "resume", unreadable="ckpt_00000003.pth")
    # rank 0 could read step 3's file, rank 1 could not: both resume step 2's and redo step 2
    assert r0 == r1 == {"status": "max_steps", "steps": [2, 3, 4]}
    log = (run_dir / "log.txt").read_text()
    assert "skipping checkpoint" in log and "ckpt_00000003.pth: another rank cannot load it" in log
    assert "resumed from" in log and "ckpt_00000002.pth: step 2" in log
