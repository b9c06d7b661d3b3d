"""Two gloo ranks on the CPU: ranks stay in sync, and match one process with the same global batch."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from pretrain.config import load_config
from pretrain.engine.distributed import expand_nodelist, export_slurm_env, per_rank_batch
from pretrain.engine.hooks import HookBase
from pretrain.train import request_checkpoint_and_exit, run
from tests._engine_common import make_toy, tiny_overrides
from pretrain.engine.distributed import free_port


def bn_eval(method: nn.Module) -> None:
    """Freeze BN statistics (running mean 0 / var 1 at init): with per-rank batch statistics a
    2-rank step is not the same function as a 1-process step, with frozen ones it is."""
    for m in method.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class FrozenBN(HookBase):
    """BN in eval mode before every step (the loop and the slot pictures switch the method to train mode)."""

    def before_step(self) -> None:
        bn_eval(self.trainer.method)


class Probe(HookBase):
    """Keeps the trained method; optionally asks rank 1 alone to stop after a given step."""

    def __init__(self, rank: int, stop_rank1_at: int) -> None:
        self.rank, self.stop_at, self.method = rank, stop_rank1_at, None

    def before_train(self) -> None:
        self.method = self.trainer.method

    def after_step(self) -> None:
        if self.rank == 1 and self.trainer.step - 1 == self.stop_at:  # e.g. SIGTERM reaching one node first
            request_checkpoint_and_exit("test: rank 1 only")


def _worker(rank: int, world: int, port: int, overrides: list[str], out_dir: str, frozen_bn: bool,
            stop_rank1_at: int = -1) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = load_config(None, overrides)
    probe = Probe(rank, stop_rank1_at)
    res = run(cfg, [probe, *([FrozenBN()] if frozen_bn else [])])
    method = probe.method
    # Fingerprints of this rank's final weights and buffers: DDP must keep the ranks identical.
    prints = {name: float(sum(p.double().sum() for p in getattr(method, name).parameters()))
              for name in ("encoder", "teacher_encoder", "projector", "predictor", "prototypes")}
    prints["center"] = float(method.center.double().sum())
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"history": res.history, "status": res.status,
                                                            "weights": prints}))


def _spawn(overrides: list[str], out_dir: Path, frozen_bn: bool, stop_rank1_at: int = -1) -> list[dict]:
    mp.spawn(_worker, args=(2, free_port(), overrides, str(out_dir), frozen_bn, stop_rank1_at), nprocs=2,
             join=True)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy"))


def test_two_ranks_train_in_sync(toy, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(toy, run_dir, **{"train.max_steps": 3, "train.checkpoint_every_steps": 0})
    r0, r1 = _spawn(overrides, tmp_path, frozen_bn=False)
    assert r0["status"] == r1["status"] == "max_steps"
    assert r0["weights"] == r1["weights"]
    assert [h["step"] for h in r0["history"]] == [0, 1, 2]
    for a, b in zip(r0["history"], r1["history"]):
        assert a == b  # reduced terms, lr, momentum: bit-identical on both ranks
        assert all(v == v for v in a.values())  # finite/non-NaN
    state = torch.load(run_dir / "checkpoints" / "ckpt_00000003.pth", weights_only=True)
    assert state["step"] == 3 and state["step_in_epoch"] == 3
    # only rank 0 writes the run dir's logs
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3


def test_stop_on_one_rank_stops_all_at_the_same_step(toy, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(toy, run_dir, **{"train.checkpoint_every_steps": 0})
    r0, r1 = _spawn(overrides, tmp_path, frozen_bn=False, stop_rank1_at=0)
    # rank 1's request after step 0 enters the all-reduced flag of step 1: both stop after it
    assert r0["status"] == r1["status"] == "preempted"
    assert [h["step"] for h in r0["history"]] == [h["step"] for h in r1["history"]] == [0, 1]
    assert r0["weights"] == r1["weights"]
    state = torch.load(run_dir / "checkpoints" / "ckpt_00000002.pth", weights_only=True)
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (2, 0, 2)


@pytest.mark.slow
def test_two_ranks_match_one_process_with_frozen_bn(toy, tmp_path):
    overrides = lambda d: tiny_overrides(toy, d, **{"train.max_steps": 2, "train.checkpoint_every_steps": 0,
                                                    "train.export_backbone": False})
    r0, r1 = _spawn(overrides(tmp_path / "two"), tmp_path, frozen_bn=True)
    torch.set_num_threads(1)
    single = run(load_config(None, overrides(tmp_path / "one")), [FrozenBN()])
    assert r0["history"] == r1["history"]
    for two, one in zip(r0["history"], single.history):
        # Same samples (DistributedSampler order), same augmentations ((seed, epoch, index)), slot
        # negatives gathered over ranks, slot loss normalised by the global count: equal up to
        # float summation order. Step 1 also checks the DDP-averaged gradients of step 0.
        for k in ("loss", "loss_group", "loss_slot", "active_slots", "entropy"):
            assert two[k] == pytest.approx(one[k], rel=1e-5, abs=1e-6), (two["step"], k)
    assert single.history[1]["loss"] != single.history[0]["loss"]


def test_global_batch_must_divide():
    assert per_rank_batch(512, 8) == 64
    with pytest.raises(ValueError, match="optim.batch_size=10 is not divisible by the world size 4"):
        per_rank_batch(10, 4)


def test_slurm_env_is_translated():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_JOB_ID": "12345", "MASTER_ADDR": "10.0.0.7"}
    export_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_PORT"]) == ("3", "4", "1", "32345")
    assert env["MASTER_ADDR"] == "10.0.0.7"  # an explicit address wins
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "8"}
    export_slurm_env(torchrun)
    assert torchrun["RANK"] == "0"  # torchrun/submitit variables take precedence
    assert expand_nodelist("gpu[07-09,11],cpu1") == ["gpu07", "gpu08", "gpu09", "gpu11", "cpu1"]
