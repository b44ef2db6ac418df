"""A real two-node Slurm cluster on this machine, for tests (and by hand).

Debian's Slurm is built with MULTIPLE_SLURMD, so one host can run two `slurmd` daemons
that slurmctld sees as two nodes. Settings follow what was verified on these machines
(no systemd, no cgroups): linuxproc process tracking, no task plugin, cons_tres with
cores, accounting off. munge runs with its own key and socket inside the cluster
directory, so nothing under /etc or /run is touched.

Nodes may declare more CPUs than the host has (`SlurmdParameters=config_overrides`), and
GPUs that are not there: gres/gpu devices backed by character devices such as /dev/null.
Slurm then allocates, counts and reports them (SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES)
as on a GPU cluster, so GPU requests can be checked without GPUs.

By hand::

    python -m tests.slurm.cluster /tmp/cluster     # starts, prints SLURM_CONF, waits
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
# Stand-ins for GPU device files: slurmd only needs distinct character devices.
FAKE_GPU_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/urandom")


def missing_daemons() -> list[str]:
    """The Slurm/munge programs that are not installed (empty when all are)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    needed = (*DAEMONS, "sbatch", "scontrol", "squeue", "scancel")
    return [name for name in needed if shutil.which(name, path=search) is None]


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _resolves(name: str) -> bool:
    try:
        socket.gethostbyname(name)
        return True
    except OSError:
        return False


@dataclass
class Cluster:
    """Two simulated nodes, one partition `debug`; `env` points clients at it."""

    root: Path
    nodes: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster."""
        return subprocess.run(
            list(args),
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
        )

    def write_config(self, cpus: int, gpus: int = 0) -> None:
        host = socket.gethostname().split(".")[0]
        # The first node carries the real host name (slurmd and torchrun's rendezvous both
        # resolve node names); the second must resolve too: "localhost" always does.
        second = "localhost" if host != "localhost" else "loopback-node"
        if not _resolves(second):
            raise RuntimeError(f"node name {second!r} does not resolve")
        self.nodes = [host, second]
        ctld, *slurmd_ports = _free_ports(1 + len(self.nodes))
        r = self.root
        for sub in ("state", "spool", "log", "munge"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o700)
        lines = [
            "ClusterName=bigfttest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start
            # again (default 120 s); short here so the requeue test stays fast.
            f"AuthInfo=socket={r}/munge/munge.socket,cred_expire=5",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "SchedulerType=sched/builtin",
            # Schedule every second: a requeued job becomes eligible again only at the
            # next periodic pass (60 s by default).
            "SchedulerParameters=sched_interval=1",
            "KillWait=5",
            "MinJobAge=600",
            "InactiveLimit=0",
        ]
        gres = ""
        if gpus:
            if gpus > len(FAKE_GPU_DEVICES):
                raise ValueError(f"at most {len(FAKE_GPU_DEVICES)} fake GPUs per node")
            lines.append("GresTypes=gpu")
            gres = f" Gres=gpu:{gpus}"
            devices = [f"Name=gpu File={dev}" for dev in FAKE_GPU_DEVICES[:gpus]]
            (r / "gres.conf").write_text("\n".join(["AutoDetect=off", *devices]) + "\n")
        for name, port in zip(self.nodes, slurmd_ports, strict=True):
            lines.append(
                f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={cpus} RealMemory=4000{gres} State=UNKNOWN"
            )
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, cpus: int = 1, gpus: int = 0, timeout: float = 60.0) -> None:
        """Write the config, start munged, slurmctld and one slurmd per node; wait idle.

        `cpus` and `gpus` are what each node declares (gres.conf sits beside slurm.conf).
        """
        self.write_config(cpus, gpus)
        r = self.root
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn(
            "munged", "--foreground", "--force", f"--socket={r}/munge/munge.socket",
            f"--key-file={key}", f"--pid-file={r}/munge/munged.pid",
            f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge/seed",
        )  # fmt: skip
        self._wait_for(lambda: (r / "munge" / "munge.socket").exists(), "munged", timeout)
        self._spawn("slurmctld", "-D", "-i", "-f", str(self.conf))
        for name in self.nodes:
            (r / "spool" / name).mkdir(exist_ok=True)
            self._spawn("slurmd", "-D", "-N", name, "-f", str(self.conf))
        self._wait_for(self._all_idle, "two idle nodes", timeout)

    def _spawn(self, *argv: str) -> None:
        log = open(self.root / "log" / f"{argv[0]}-{len(self.procs)}.stdout", "wb")  # noqa: SIM115
        exe = shutil.which(argv[0], path=os.pathsep.join(["/usr/sbin", "/sbin", "/usr/bin"]))
        self.procs.append(
            subprocess.Popen(
                [exe or argv[0], *argv[1:]],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,
            )
        )

    def _all_idle(self) -> bool:
        done = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        states = dict(line.split() for line in done.stdout.splitlines() if line.strip())
        return len(states) == len(self.nodes) and all(s == "idle" for s in states.values())

    def _wait_for(self, ready: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [p.args for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"daemon exited while waiting for {what}: {dead}\n{self.logs()}")
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}\n{self.logs()}")

    def logs(self, tail: int = 30) -> str:
        """The last lines of every daemon log (for failure messages)."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel all jobs, then stop the daemons (slurmd first, munged last)."""
        if self.procs:
            self.run("scancel", "--full", "-u", str(os.getuid()), check=False)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs.clear()


if __name__ == "__main__":
    import signal

    # SIGTERM (e.g. from `timeout`) must still stop the daemons in `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    cluster = Cluster(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/bigft-cluster"))
    cluster.start()
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        cluster.stop()
