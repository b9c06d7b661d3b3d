"""Shared pytest fixtures (keep minimal: only fixtures several test files need)."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real SLURM on loopback (two simulated nodes, 2 CPUs each), for tests marked ``slurm``.

    Skips only when SLURM cannot be installed or started here (the reason is in the message).
    Sets ``SLURM_CONF`` for the session so sbatch/squeue/scontrol (and submitit) talk to it.
    """
    from tests.slurm_cluster import SlurmCluster, SlurmUnavailable

    try:
        cluster = SlurmCluster.start(tmp_path_factory.mktemp("slurm"), nodes=2, cpus_per_node=2)
    except SlurmUnavailable as e:
        pytest.skip(f"SLURM cannot be installed/started on this machine: {e}")
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
