"""A real SLURM cluster on loopback, in a temporary directory, for the tests of `slurm/`.

One `munged`, one `slurmctld` and one `slurmd` per simulated node, all started as child
processes in the foreground (so we hold their PIDs and stop exactly those), with every state,
spool, log and socket path inside the temporary directory. Two simulated nodes share the
machine through `NodeHostname=localhost NodeAddr=127.0.0.1` and distinct `Port`s; each
`slurmd` is told its node name with `-N`. Accounting is off, so `sacct` does not work here:
job states come from `scontrol`/`squeue` (see `slurm.state`).

Usage (the session fixture in tests/conftest.py does this)::

    cluster = SlurmCluster.start(tmp_dir, nodes=2, cpus_per_node=2)
    os.environ["SLURM_CONF"] = str(cluster.conf)   # sbatch/squeue/scontrol read it
    ...
    cluster.stop()

`SlurmCluster.start` raises `SlurmUnavailable` with the reason (missing binaries, not root,
a daemon that would not come up, with its log tail) when SLURM cannot be installed or started;
the fixture turns that, and only that, into a skip (`start_or_skip`). Under `make test`, which
installs SLURM first and sets `PRETRAIN_REQUIRE_SLURM=1`, it is a failure instead: there a
SLURM that does not start is a broken setup, and a skip would let the real-SLURM tests pass unseen.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.engine.distributed import free_port

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "srun", "sinfo")
REQUIRE_ENV = "PRETRAIN_REQUIRE_SLURM"


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started on this machine (the reason is the message)."""


def _tail(path: Path, n: int = 30) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


@dataclass
class SlurmCluster:
    """Handle on the running daemons; `env` is what a client (sbatch, squeue) needs."""

    root: Path
    conf: Path
    node_names: list[str]
    cpus_per_node: int
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    # ------------------------------------------------------------------ start
    @classmethod
    def start(cls, root: Path, nodes: int = 2, cpus_per_node: int = 2, timeout_s: float = 60.0) -> "SlurmCluster":
        """Write the config, start munged, slurmctld and one slurmd per node; wait for idle nodes."""
        missing = [b for b in BINARIES if shutil.which(b) is None]
        if missing:
            raise SlurmUnavailable(
                f"SLURM binaries missing: {missing} (install with: apt-get install -y slurmctld slurmd slurm-client munge)")
        if os.geteuid() != 0:
            raise SlurmUnavailable("slurmd must run as root to launch jobs; the tests are not running as root")
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        # munged refuses a socket directory that others cannot traverse (or that others can write).
        for d in (root, root / "munge", root / "state", root / "spool", root / "log"):
            d.mkdir(exist_ok=True)
            d.chmod(0o755)
        # A private key: every daemon and client of this cluster runs here as root, and the
        # system's /etc/munge/munge.key (if any) stays untouched.
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        names = [f"node{i + 1}" for i in range(nodes)]
        conf = root / "slurm.conf"
        conf.write_text(cls._conf_text(root, names, cpus_per_node))
        cluster = cls(root=root, conf=conf, node_names=names, cpus_per_node=cpus_per_node)
        try:
            cluster._start_daemons(timeout_s)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @staticmethod
    def _conf_text(root: Path, names: list[str], cpus: int) -> str:
        lines = [
            "ClusterName=looptest",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={free_port()}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={root}/munge/munge.socket",
            f"StateSaveLocation={root}/state",
            f"SlurmdSpoolDir={root}/spool/%n",
            f"SlurmctldPidFile={root}/slurmctld.pid",
            f"SlurmdPidFile={root}/slurmd.%n.pid",
            f"SlurmctldLogFile={root}/log/slurmctld.log",
            f"SlurmdLogFile={root}/log/slurmd.%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            # A requeued job may start again at once (the preemption test waits for it).
            "SchedulerParameters=defer_batch=0",
            "MinJobAge=3600",
            "KillWait=10",  # seconds between SIGTERM and SIGKILL: room for a checkpoint on SIGTERM
            "InactiveLimit=0",
            "SlurmdTimeout=60",
            "SlurmctldTimeout=60",
            "JobRequeue=1",
        ]
        for i, n in enumerate(names):
            lines.append(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={free_port()} "
                         f"CPUs={cpus} RealMemory=1000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(names)} Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        # A new session: a Ctrl-C in pytest must not reach the daemons before we stop them by PID.
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)

    def _start_daemons(self, timeout_s: float) -> None:
        r = self.root
        self._spawn("munged", ["munged", "-F", "--force", f"--socket={r}/munge/munge.socket",
                               f"--pid-file={r}/munge/munged.pid", f"--log-file={r}/log/munged.log",
                               f"--seed-file={r}/munge/munged.seed", f"--key-file={r}/munge/munge.key"])
        self._wait(lambda: (r / "munge" / "munge.socket").exists(), timeout_s, "munged", r / "log" / "munged.log")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._run(["scontrol", "ping"]).stdout.find("UP") >= 0, timeout_s,
                   "slurmctld", r / "log" / "slurmctld.log")
        for n in self.node_names:
            (r / "spool" / n).mkdir(exist_ok=True)
            self._spawn(f"slurmd-{n}", ["slurmd", "-D", "-N", n, "-f", str(self.conf)])

        def all_idle() -> bool:
            out = self._run(["sinfo", "-h", "-N", "-o", "%N %T"]).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            return all(states.get(n, "").rstrip("*") == "idle" for n in self.node_names)

        self._wait(all_idle, timeout_s, "slurmd", r / "log" / f"slurmd.{self.node_names[0]}.log")

    def _wait(self, ready, timeout_s: float, what: str, log: Path) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout_s:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with code {p.returncode} while starting {what}:\n"
                                           f"{_tail(self.root / 'log' / f'{name}.out')}\n{_tail(log)}")
            try:
                if ready():
                    return
            except (OSError, subprocess.SubprocessError):
                pass
            time.sleep(0.3)
        raise SlurmUnavailable(f"{what} not ready after {timeout_s:.0f}s; log tail:\n{_tail(log)}")

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30,
                              env=dict(os.environ, SLURM_CONF=str(self.conf)))

    # ------------------------------------------------------------------ use
    def scontrol(self, *args: str) -> str:
        """Run `scontrol ARGS` against this cluster and return stdout (raises on failure)."""
        p = self._run(["scontrol", *args])
        if p.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)} failed: {p.stderr.strip()}")
        return p.stdout

    def cancel_all(self) -> None:
        """Cancel every job (between tests, so one test's leftovers cannot block the next)."""
        self._run(["scancel", "--user", "root"])

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Stop the daemons we started, by PID: slurmds first, then slurmctld, then munged."""
        if self.procs:
            self._run(["scancel", "--user", "root"]) if "slurmctld" in self.procs else None
        order = [k for k in self.procs if k.startswith("slurmd-")] + ["slurmctld", "munged"]
        for name in order:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self.procs.clear()


def slurm_required() -> bool:
    """True when the environment says SLURM was installed for this run (`make test`), so it must start."""
    return os.environ.get(REQUIRE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def start_or_skip(root: Path, **kwargs) -> SlurmCluster:
    """`SlurmCluster.start`, with `SlurmUnavailable` turned into a skip, or into a failure where
    `slurm_required()`; any other error propagates unchanged (a bug here must not read as "no SLURM")."""
    import pytest

    try:
        return SlurmCluster.start(root, **kwargs)
    except SlurmUnavailable as e:
        if slurm_required():
            pytest.fail(f"SLURM did not start although {REQUIRE_ENV} is set (make test installs it, so the "
                        f"real-SLURM tests must run): {e}", pytrace=False)
        pytest.skip(f"SLURM cannot be installed/started on this machine ({REQUIRE_ENV} unset): {e}")
