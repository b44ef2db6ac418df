"""`bigft slurm status` without a cluster: stub squeue, sacct and scontrol print what Slurm
would, so every job state can be checked (the real cluster in test_cluster.py runs a few)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bigft.commands import app
from bigft.slurm import job as slurm_job
from bigft.slurm import queue as slurm_queue
from tests.slurm.test_render import write_yaml

JOB = "77"

# Prints the reply set for this program (<program>.out, exit code in <program>.rc); with
# none it fails, as squeue does for a job it no longer knows and sacct does without
# accounting.
SLURM_STUB = """#!/bin/sh
cat "$0.out" 2>/dev/null
exit "$(cat "$0.rc" 2>/dev/null || echo 1)"
"""


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Call with program=(stdout, exit code) to set what squeue / sacct / scontrol answer."""
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir()
    programs = ("squeue", "sacct", "scontrol")
    for name in programs:
        (bin_dir / name).write_text(SLURM_STUB)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    def answer(**replies: tuple[str, int]) -> None:
        for name in programs:
            out, code = replies.get(name, ("", 1))
            (bin_dir / f"{name}.out").write_text(out)
            (bin_dir / f"{name}.rc").write_text(str(code))

    answer()
    return answer


def scontrol(state: str, exit_code: str = "0:0", restarts: int = 0) -> tuple[str, int]:
    """One `scontrol -o show job` record."""
    line = (
        f"JobId={JOB} JobName=run UserId=root(0) JobState={state} Reason=None "
        f"Requeue=1 Restarts={restarts} ExitCode={exit_code} RunTime=00:00:05 NumNodes=2\n"
    )
    return line, 0


def submitted(tmp_path: Path, requeue: bool = True, steps: int = 0, finished: bool = False) -> Path:
    """A run directory as `bigft slurm submit` leaves it, `steps` into training."""
    run_dir = tmp_path / "run"
    cfg_path = write_yaml(tmp_path / "cfg.yaml", {"requeue": requeue}, run_dir)
    script = slurm_job.prepare_job(slurm_job.load_job_config(cfg_path, []), cfg_path)
    record = {"job_id": JOB, "script": str(script), "array_size": None, "time": 0.0}
    (script.parent / "job.json").write_text(json.dumps({"jobs": [record]}))
    metrics = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, steps + 1))
    (run_dir / "metrics.jsonl").write_text(metrics)
    if finished:
        (run_dir / "summary.json").write_text(json.dumps({"steps": steps}))
    return run_dir


def status(run_dir: Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["slurm", "status", str(run_dir)])
    return result.exit_code, result.stdout


@pytest.mark.parametrize(
    ("state", "outcome"),
    [
        ("PENDING", "pending"),
        ("CONFIGURING", "pending"),
        ("REQUEUED", "pending"),
        ("REQUEUE_HOLD", "pending"),
        ("RUNNING", "running"),
        ("COMPLETING", "running"),
        ("SUSPENDED", "running"),
        ("COMPLETED", "completed"),
        ("FAILED", "failed"),
        ("CANCELLED", "failed"),
        ("CANCELLED by 0", "failed"),  # sacct's spelling
        ("TIMEOUT", "failed"),
        ("OUT_OF_MEMORY", "failed"),
        ("NODE_FAIL", "failed"),
        ("BOOT_FAIL", "failed"),
        ("DEADLINE", "failed"),
        ("PREEMPTED", "pending"),  # a --requeue job goes back to the queue
        ("SOMETHING_NEW", "unknown"),
    ],
)
def test_every_slurm_state_has_a_meaning(state: str, outcome: str) -> None:
    assert slurm_queue.state_outcome(state) == outcome
    assert slurm_queue.state_outcome("PREEMPTED", requeue=False) == "failed"


def test_failed_job_is_reported_failed_with_its_log(tmp_path: Path, fake_slurm) -> None:
    run_dir = submitted(tmp_path, steps=3)
    log = run_dir / "slurm" / f"job-{JOB}.out"
    log.write_text("bigft: job 77 (restart 0)\nRuntimeError: CUDA error: out of memory\n")
    fake_slurm(scontrol=scontrol("FAILED", exit_code="1:0"))
    code, out = status(run_dir)
    assert code == 1, out
    assert f"job {JOB}: state=FAILED" in out and "exit_code=1:0" in out
    assert "training: step 3 (failed: job FAILED, exit code 1:0)" in out
    assert "in progress" not in out
    assert "RuntimeError: CUDA error: out of memory" in out  # the end of the log
    assert str(log) in out


@pytest.mark.parametrize("state", ["CANCELLED by 0", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"])
def test_sacct_states_that_end_a_run_are_failures(tmp_path: Path, fake_slurm, state: str) -> None:
    run_dir = submitted(tmp_path, steps=3)
    fake_slurm(sacct=(f"{JOB}|{state}|0:9|00:10:00\n", 0))
    code, out = status(run_dir)
    assert code == 1, out
    assert f"(failed: job {state.split()[0]}" in out


def test_queued_running_and_finished_jobs_succeed(tmp_path: Path, fake_slurm) -> None:
    run_dir = submitted(tmp_path, steps=2)
    fake_slurm(squeue=(f"{JOB}|PENDING|Priority|0:00|\n", 0), scontrol=scontrol("PENDING"))
    code, out = status(run_dir)
    assert code == 0 and "training: step 2 (queued)" in out
    fake_slurm(squeue=(f"{JOB}|RUNNING|None|1:00|n1\n", 0), scontrol=scontrol("RUNNING"))
    code, out = status(run_dir)
    assert code == 0 and "training: step 2 (in progress)" in out
    # Preempted with --requeue: Slurm puts it back in the queue; not a failure.
    fake_slurm(scontrol=scontrol("PREEMPTED"))
    code, out = status(run_dir)
    assert code == 0 and "training: step 2 (queued" in out
    finished = submitted(tmp_path, steps=5, finished=True)
    fake_slurm(scontrol=scontrol("COMPLETED"))
    code, out = status(finished)
    assert code == 0 and "training: step 5 (finished)" in out


def test_preempted_job_that_cannot_requeue_failed(tmp_path: Path, fake_slurm) -> None:
    run_dir = submitted(tmp_path, requeue=False, steps=4)
    fake_slurm(scontrol=scontrol("PREEMPTED", exit_code="0:15"))
    code, out = status(run_dir)
    assert code == 1 and "(failed: job PREEMPTED" in out


def test_job_that_ended_before_training_finished_failed(tmp_path: Path, fake_slurm) -> None:
    """Exit status 0 without summary.json: e.g. stopped, and max_restarts forbade a requeue."""
    run_dir = submitted(tmp_path, steps=4)
    fake_slurm(scontrol=scontrol("COMPLETED"))
    code, out = status(run_dir)
    assert code == 1 and "training: step 4 (failed: the job ended before training finished" in out


def test_status_reads_the_job_files_once_slurm_forgot_the_job(tmp_path: Path, fake_slurm) -> None:
    run_dir = submitted(tmp_path, steps=3)
    log = run_dir / "slurm" / f"job-{JOB}.out"
    fake_slurm()  # squeue, sacct, scontrol: no such job
    log.write_text("bigft: training step exited with status 137 at 2025-01-01T00:00:00\n")
    code, out = status(run_dir)
    assert code == 1 and "no longer known to Slurm" in out
    assert '(failed: its log says "training step exited with status 137")' in out
    log.write_text("bigft: job restarted 4 times (slurm.max_restarts = 3); giving up\n")
    code, out = status(run_dir)
    assert code == 1 and 'log says "job restarted 4 times (slurm.max_restarts = 3); giving' in out
    finished = submitted(tmp_path, steps=5, finished=True)
    (finished / "slurm" / f"job-{JOB}.out").write_text(
        "bigft: training step exited with status 0 at 2025-01-01T00:00:00\n"
    )
    code, out = status(finished)
    assert code == 0 and "training: step 5 (finished)" in out
