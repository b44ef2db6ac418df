"""A real Slurm cluster for the whole test session (started only when a test asks)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm.cluster import Cluster, missing_daemons


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Cluster]:
    """munged + slurmctld + two slurmd (two nodes) on this machine.

    Each node declares 8 CPUs and one (fake) GPU, so a job can ask for what a GPU job asks
    for; what really runs is the tests' CPU training, one process per node.

    Skipped, with the reason, when Slurm is not installed or we are not root (slurmd
    must start jobs as their user). SLURM_CONF points every client at it meanwhile.
    """
    missing = missing_daemons()
    if missing:
        pytest.skip(
            f"Slurm is not installed ({', '.join(missing)} not found); on Debian/Ubuntu: "
            "apt-get install munge slurmctld slurmd slurm-client"
        )
    if os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs root (slurmd runs jobs as their user)")
    # A short path: munge's unix socket lives inside it (sun_path is 108 bytes).
    root = Path(tempfile.mkdtemp(prefix="bigft-slurm-"))
    cluster = Cluster(root)
    old = os.environ.get("SLURM_CONF")
    try:
        cluster.start(cpus=8, gpus=1)
    except Exception:
        cluster.stop()
        raise
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        shutil.rmtree(root, ignore_errors=True)
