"""bigft on a real Slurm cluster (two slurmd nodes on this machine, CPU, gloo).

Each job trains the tiny Llama with one process per node, so every run is a two-node,
world-size-2 run through the rendered sbatch script, srun, launch/slurm_node.sh and
torchrun's c10d rendezvous, exactly as on a GPU cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigft.slurm import queue as slurm_queue
from bigft.slurm import sweep as slurm_sweep
from tests.helpers import alpaca_rows, write_config, write_jsonl
from tests.slurm.cluster import Cluster

pytestmark = pytest.mark.slow

STEPS = 150  # long enough (~10 s of training) to signal the job mid-run
NASTY_NAME = "job \"x\" 'y' $(touch pwned) `touch pwned2`; z #1 100%"


def bigft(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "bigft", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def wait_for_job(cluster: Cluster, job_id: str, timeout: float = 240) -> list[dict[str, str]]:
    """Poll until no part of the job is queued or running; its scontrol records."""
    deadline = time.monotonic() + timeout
    while cluster.run("squeue", "-h", "-j", job_id, check=False).stdout.strip():
        if time.monotonic() > deadline:
            cluster.run("scancel", job_id, check=False)
            pytest.fail(f"job {job_id} still running after {timeout} s\n{cluster.logs()}")
        time.sleep(0.3)
    shown = cluster.run("scontrol", "-o", "show", "job", job_id).stdout
    return [slurm_queue.parse_scontrol(line) for line in shown.splitlines()]


def logged_steps(output_dir: Path) -> int:
    path = output_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return sum(1 for line in lines if line.endswith("}") and '"loss"' in line)


@pytest.fixture(scope="module")
def job_config(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("slurm-jobs")
    data = write_jsonl(work / "train.jsonl", alpaca_rows(96))
    return write_config(
        work / "cfg.yaml",
        tiny_base,
        data,
        train={"steps": STEPS},
        data={"prepared_dir": str(work / "prepared")},
        slurm={
            "processes_per_node": 1,
            "python": sys.executable,
            "env": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        },
    )


@pytest.fixture(scope="module")
def baseline(slurm_cluster: Cluster, job_config: Path) -> Path:
    """An uninterrupted two-node run, into a directory whose name is hostile to shells."""
    out = job_config.parent / "run 'a' \"b\" $(touch pwned3) `x`; y 50%j"
    job_id = bigft(
        "slurm", "submit", job_config, "--nodes", "2", "--job-name", NASTY_NAME,
        f"output_dir={out}",
    ).stdout.strip()  # fmt: skip
    [record] = wait_for_job(slurm_cluster, job_id)
    assert record["JobState"] == "COMPLETED", (out / "slurm" / f"job-{job_id}.out").read_text()
    return out


def test_two_node_job_trains_and_exports(slurm_cluster: Cluster, baseline: Path) -> None:
    from transformers import AutoModelForCausalLM

    summary = json.loads((baseline / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    log = next((baseline / "slurm").glob("job-*.out")).read_text()
    # Each node computed its own rank: the batch shell could not have.
    assert "node 0 of 2" in log and "node 1 of 2" in log
    # The two nodes' processes prepared the data once, through the lock file (no
    # collective that could time out), and both trained on it.
    store = baseline.parent / "prepared"
    assert len([p for p in store.iterdir() if p.is_dir()]) == 1, list(store.iterdir())
    assert not list(store.glob("*.lock")) and not list(store.glob("*.tmp*"))
    # Rank 0 says which process prepared: itself, or the other node's.
    said = ("data: prepared into", "data: prepared by another process into")
    assert sum(log.count(f"{words} {store}/") for words in said) == 1, log
    weights = load_file(baseline / "final" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    model = AutoModelForCausalLM.from_pretrained(baseline / "final")
    assert torch.equal(model.lm_head.weight, weights["lm_head.weight"])
    # sbatch read the hostile job name and log path exactly; nothing ran from them.
    job_id = slurm_queue.last_job(baseline)["job_id"]
    shown = slurm_cluster.run("scontrol", "show", "job", job_id).stdout
    assert f"JobName={NASTY_NAME}\n" in shown
    assert not list(Path.cwd().glob("pwned*")) and not list(baseline.parent.glob("pwned*"))
    status = bigft("slurm", "status", baseline).stdout
    assert "state=COMPLETED" in status and f"step {STEPS} (finished)" in status


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_weights(
    slurm_cluster: Cluster, job_config: Path, baseline: Path
) -> None:
    out = job_config.parent / "preempted"
    job_id = bigft("slurm", "submit", job_config, "--nodes", "2", f"output_dir={out}").stdout
    job_id = job_id.strip()
    deadline = time.monotonic() + 120
    while logged_steps(out) < 3:
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)
    # What Slurm does at --signal=USR1@T: USR1 to every process of the job steps.
    slurm_cluster.run("scancel", "--signal=USR1", job_id)
    [record] = wait_for_job(slurm_cluster, job_id)
    log = (out / "slurm" / f"job-{job_id}.out").read_text()
    assert record["JobState"] == "COMPLETED", log[-3000:]
    assert record["Restarts"] == "1", log[-3000:]
    assert "(SIGUSR1); checkpoint written" in log and f"job {job_id} requeued" in log
    assert "resumed from" in log and "(restart 1)" in log
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").open()) if "loss" in r]
    assert steps[-1] == STEPS and len(steps) == STEPS, "a step was lost or repeated"
    straight = load_file(baseline / "final" / "model.safetensors")
    resumed = load_file(out / "final" / "model.safetensors")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_array_sweep_runs_every_task(slurm_cluster: Cluster, job_config: Path) -> None:
    out = job_config.parent / "sweep"
    job_id = bigft(
        "slurm", "sweep", job_config, "train.steps=10", f"output_dir={out}",
        "--grid", "optim.lr=1e-3,3e-3",
    ).stdout.strip()  # fmt: skip
    records = wait_for_job(slurm_cluster, job_id)
    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1"]
    rows = slurm_sweep.sweep_rows(out)
    assert [r["state"] for r in rows] == ["COMPLETED", "COMPLETED"]
    assert [r["step"] for r in rows] == [10, 10] and all(r["finished"] for r in rows)
    configs = [(Path(r["output_dir"]) / "config.yaml").read_text() for r in rows]
    assert "lr: 0.001" in configs[0] and "lr: 0.003" in configs[1]
    a, b = (load_file(Path(r["output_dir"]) / "final" / "model.safetensors") for r in rows)
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])
    table = bigft("slurm", "sweep-status", out).stdout
    assert table.count("COMPLETED") == 2 and "optim.lr=3e-3" in table


def test_render_check_asks_the_cluster(slurm_cluster: Cluster, job_config: Path) -> None:
    out = job_config.parent / "checked"
    done = bigft("slurm", "render", job_config, "--nodes", "3", "--check", f"output_dir={out}",
                 check=False)  # fmt: skip
    assert done.returncode == 2
    assert "Requested node configuration is not available" in done.stderr
    assert "Traceback" not in done.stderr
    fits = bigft("slurm", "render", job_config, "--nodes", "2", "--check", f"output_dir={out}")
    assert "to start at" in fits.stderr


def test_failed_job_is_reported_failed(slurm_cluster: Cluster, job_config: Path) -> None:
    """A GPU job with the default CPU request whose node 1 exits with status 3 while node 0
    is still running: srun stops node 0 with SIGTERM and itself returns 143, yet the job
    reports node 1's status."""
    out = job_config.parent / "fails"
    launcher = job_config.parent / "node-1-fails.sh"
    launcher.write_text(
        '#!/bin/bash\nif [[ "$SLURM_NODEID" == 1 ]]; then sleep 1; exit 3; fi\nexec sleep 120\n'
    )
    launcher.chmod(0o755)
    job_id = bigft(
        "slurm", "submit", job_config, "--nodes", "2", "--gpus-per-node", "1",
        f"slurm.python={launcher}", f"output_dir={out}",
    ).stdout.strip()  # fmt: skip
    script = (out / "slurm" / "job.sbatch").read_text()
    # One rank per node (processes_per_node: 1) x the default 8 CPUs per GPU.
    assert "#SBATCH --cpus-per-task=8\n" in script
    [record] = wait_for_job(slurm_cluster, job_id)
    log = (out / "slurm" / f"job-{job_id}.out").read_text()
    assert record["JobState"] == "FAILED" and record["ExitCode"] == "3:0", log
    assert record["NumCPUs"] == "16" and record["TRES"].startswith("cpu=16,")
    assert "node 1 failed first, with status 3; srun then stopped" in log
    assert "(srun status 143)" in log
    assert "training step exited with status 3" in log
    records = sorted((out / "slurm" / "exits" / f"{job_id}.0").iterdir())
    assert [r.name for r in records][-1] == "node-1"
    done = bigft("slurm", "status", out, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"job {job_id}: state=FAILED" in done.stdout
    assert "training: step 0 (failed: job FAILED, exit code 3:0)" in done.stdout
    assert "in progress" not in done.stdout
