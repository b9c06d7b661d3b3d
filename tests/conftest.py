"""Shared pytest fixtures (keep minimal: only fixtures several test files need)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# TensorBoard's protobuf modules are imported here, at collection, not first inside a test: the suite builds and
# drops numba dispatchers (FFCV), whose finalizers can run in the middle of a later first import of protobuf, and
# CPython 3.11's import lock then raises KeyError from importlib._bootstrap (seen once in Detectron2's writer).
import torch.utils.tensorboard  # noqa: E402,F401


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real SLURM on loopback (two simulated nodes, 2 CPUs each), for tests marked ``slurm``.

    When SLURM cannot be installed or started here, skips, or fails where ``PRETRAIN_REQUIRE_SLURM``
    is set (``make test``); the reason, with the daemons' log tail, is in the message.
    Sets ``SLURM_CONF`` for the session so sbatch/squeue/scontrol (and submitit) talk to it.
    """
    from tests.slurm_cluster import start_or_skip

    cluster = start_or_skip(tmp_path_factory.mktemp("slurm"), nodes=2, cpus_per_node=2)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


@pytest.fixture
def slurm(slurm_cluster):
    """The session cluster, with every job cancelled after the test (leftovers must not block the next)."""
    yield slurm_cluster
    slurm_cluster.cancel_all()


@pytest.fixture(scope="module")
def r18_pkl(tmp_path_factory) -> Path:
    """A real method state dict (ResNet-18, no training) converted for Detectron2: enough for refusal and
    plumbing tests, fast."""
    from tests.test_convert_d2 import make_method_checkpoint
    from tools.convert_to_d2 import main as d2_convert

    d = tmp_path_factory.mktemp("w")
    make_method_checkpoint(d / "ckpt.pth", "resnet18")
    assert d2_convert([str(d / "ckpt.pth"), str(d / "r18.pkl")]) == 0
    return d / "r18.pkl"
