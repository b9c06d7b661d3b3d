"""Distributed environment inside a submitit task: torch's env:// variables, with a reachable MASTER_ADDR."""
from __future__ import annotations

import os
import re
import socket
import subprocess

import submitit


def node_addr(host: str) -> str:
    """An address for ``host``: itself when it resolves, else its SLURM ``NodeAddr``.

    Simulated nodes (several `slurmd -N name` on one machine) and some sites use node names that
    DNS does not know; a rendezvous on such a name hangs, so ask `scontrol show node` instead.
    """
    try:
        socket.gethostbyname(host)
        return host
    except OSError:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", host], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"node {host!r} does not resolve and `scontrol show node {host}` failed: {e}") from e
    m = re.search(r"NodeAddr=(\S+)", out)
    if not m:
        raise RuntimeError(f"node {host!r} does not resolve and `scontrol show node` gives no NodeAddr:\n{out}")
    return m.group(1)


def export_distributed_env() -> submitit.helpers.TorchDistributedEnvironment:
    """Export MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK(, LOCAL_WORLD_SIZE) for this task.

    All GPUs of the node stay visible: the engine selects ``cuda:LOCAL_RANK`` itself (the same
    code path as under torchrun). Overwrites stale values (a job submitted from inside a job).
    """
    env = submitit.helpers.TorchDistributedEnvironment()
    env.master_addr = node_addr(env.master_addr)
    env.export(set_cuda_visible_devices=False, overwrite=True)
    return env
