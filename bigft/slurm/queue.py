"""Submitting a job and following it: sbatch, the job's state from scontrol / sacct and its
log, the run's progress, and the requeue after a stop.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bigft.errors import BigftError
from bigft.slurm.job import REQUEUE_SIGNAL
from bigft.tracking import read_metrics

if TYPE_CHECKING:
    pass


def _slurm(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=120, env=env)
    except FileNotFoundError:
        raise BigftError(f"'{argv[0]}' not found: run this on a Slurm login node") from None


def check_script(script: Path) -> str:
    """Ask the cluster whether it could run the script (`sbatch --test-only`)."""
    done = _slurm("sbatch", "--test-only", str(script))
    message = (done.stderr or done.stdout).strip()
    if done.returncode != 0:
        reason = message.removeprefix("sbatch: error: ")
        raise BigftError(f"the cluster rejects {script}: {reason}")
    return message.removeprefix("sbatch: ")


def submit_script(
    script: Path,
    job_dir: Path,
    array_size: int | None = None,
    secrets: dict[str, str] | None = None,
) -> str:
    """`sbatch --parsable`; the job id is appended to `job.json` beside the script.

    `secrets` (from `secret_env`) reach the job through sbatch's environment only.
    """
    env = {**os.environ, **secrets} if secrets else None
    done = _slurm("sbatch", "--parsable", str(script), env=env)
    if done.returncode != 0:
        reason = done.stderr.strip().removeprefix("sbatch: error: ")
        raise BigftError(f"sbatch failed for {script}: {reason}")
    job_id = done.stdout.strip().split(";")[0]
    record_path = job_dir / "job.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"jobs": []}
    record["jobs"].append(
        {"job_id": job_id, "script": str(script), "array_size": array_size, "time": time.time()}
    )
    record_path.write_text(json.dumps(record, indent=2))
    return job_id


def last_job(run_dir: Path) -> dict[str, Any]:
    """The last submission recorded in `<run_dir>/slurm/job.json`."""
    path = run_dir / "slurm" / "job.json"
    if not path.is_file():
        raise BigftError(f"{run_dir}: no Slurm job was submitted from here ({path} missing)")
    try:
        return dict(json.loads(path.read_bytes())["jobs"][-1])
    except (ValueError, KeyError, IndexError, TypeError):
        raise BigftError(
            f"{path}: not a job record bigft wrote (unreadable or edited); submit again"
        ) from None


# What each Slurm job state means for the run. PREEMPTED is missing on purpose: a job
# submitted with --requeue goes back to the queue, one without it has ended.
STATE_OUTCOMES = {
    "pending": (
        "PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD",
        "SPECIAL_EXIT",
    ),
    # SUSPENDED and STOPPED are paused, not over: the job continues when resumed.
    "running": (
        "RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING", "SUSPENDED", "STOPPED",
    ),
    "completed": ("COMPLETED",),
    "failed": (
        "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
        "DEADLINE", "REVOKED",
    ),
}  # fmt: skip


_OUTCOME = {state: outcome for outcome, states in STATE_OUTCOMES.items() for state in states}


def parse_scontrol(line: str) -> dict[str, str]:
    """`scontrol -o show job` record -> {field: value} (values with spaces are cut short)."""
    return dict(re.findall(r"(\w+)=(\S*)", line))


def state_outcome(state: str, requeue: bool = True) -> str:
    """'pending', 'running', 'completed', 'failed' or 'unknown' for a job state as squeue,
    sacct ('CANCELLED by 1000') or scontrol spell it; `requeue`: submitted with --requeue."""
    name = state.split()[0].rstrip("+").upper() if state.strip() else ""
    if name == "PREEMPTED":
        return "pending" if requeue else "failed"
    return _OUTCOME.get(name, "unknown")


def query_states(job_id: str) -> dict[str, dict[str, str]]:
    """Job (or array task) id -> state, reason, restarts, exit code, elapsed time."""
    states: dict[str, dict[str, str]] = {}
    done = _slurm("squeue", "-h", "-r", "-j", job_id, "-o", "%i|%T|%r|%M|%N")
    for line in done.stdout.splitlines() if done.returncode == 0 else []:
        jid, state, reason, elapsed, nodes = line.split("|")
        states[jid] = {"state": state, "reason": reason, "elapsed": elapsed, "nodes": nodes}
    acct = _slurm("sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State,ExitCode,Elapsed")
    if acct.returncode == 0 and acct.stdout.strip():
        for line in acct.stdout.splitlines():
            jid, state, code, elapsed = line.split("|")
            states.setdefault(jid, {"state": state, "exit_code": code, "elapsed": elapsed})
        return states
    show = _slurm("scontrol", "-o", "show", "job", job_id)
    for line in show.stdout.splitlines() if show.returncode == 0 else []:
        f = parse_scontrol(line)
        task = f.get("ArrayTaskId")
        jid = f"{f['ArrayJobId']}_{task}" if task else f.get("JobId", job_id)
        found = states.setdefault(jid, {})
        found.setdefault("state", f.get("JobState", "?"))
        found.update(restarts=f.get("Restarts", "0"), exit_code=f.get("ExitCode", ""))
        found.setdefault("reason", f.get("Reason", ""))
        found.setdefault("elapsed", f.get("RunTime", ""))
    return states


def _log_verdict(log: Path) -> str | None:
    """How the batch script says the job ended (its last such line), or None."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    ends = r"^bigft: (training step exited with status \d+|job restarted .*; giving up)"
    found = re.findall(ends, text, re.MULTILINE)
    return found[-1] if found else None


def job_status(run_dir: Path) -> dict[str, Any]:
    """`bigft slurm status`: the Slurm states of the run's last job, its training progress,
    and one outcome: 'pending', 'running', 'completed', 'failed' or 'unknown', with why."""
    job = last_job(run_dir)
    job_id = job["job_id"]
    script = Path(job["script"])
    text = script.read_text() if script.is_file() else ""
    requeue = re.search(r'^#SBATCH "?--requeue"?$', text, re.MULTILINE) is not None
    states = query_states(job_id)
    progress = run_progress(run_dir)
    log = run_dir / "slurm" / f"job-{job_id}.out"
    status: dict[str, Any] = {"job_id": job_id, "states": states, "progress": progress}
    status["log"] = log if log.is_file() else run_dir / "slurm"
    outcomes = {jid: state_outcome(info.get("state", ""), requeue) for jid, info in states.items()}
    failed = [jid for jid, outcome in outcomes.items() if outcome == "failed"]
    if failed:
        info = states[failed[0]]
        why = f"job {info['state'].split()[0]}"
        if info.get("exit_code"):
            why += f", exit code {info['exit_code']}"
        return {**status, "outcome": "failed", "why": why}
    for outcome in ("running", "pending", "unknown"):
        if outcome in outcomes.values():
            return {**status, "outcome": outcome, "why": ""}
    if not states:  # slurmctld no longer knows the job, and there is no accounting
        verdict = None if job.get("array_size") else _log_verdict(log)
        if verdict is None and not progress["finished"]:
            return {**status, "outcome": "unknown", "why": ""}
        if verdict and not verdict.endswith(" status 0"):
            return {**status, "outcome": "failed", "why": f'its log says "{verdict}"'}
    # Every part of the job completed: a single run also wrote its summary.json. A sweep's
    # tasks train elsewhere (`bigft slurm sweep-status`).
    if not progress["finished"] and not job.get("array_size"):
        why = "the job ended before training finished (no summary.json)"
        return {**status, "outcome": "failed", "why": why}
    return {**status, "outcome": "completed", "why": ""}


def run_progress(output_dir: Path) -> dict[str, Any]:
    """What the run directory says: last step, total steps, final validation loss."""
    steps = [r["step"] for r in read_metrics(output_dir) if "loss" in r]
    summary_path = output_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    progress: dict[str, Any] = {"step": steps[-1] if steps else 0, "finished": bool(summary)}
    eval_loss = summary.get("validation", {}).get("eval_loss")
    if eval_loss is not None:
        progress["eval_loss"] = eval_loss
    return progress


def after_stop(summary: dict[str, Any], console: Any = None) -> bool:
    """Requeue this Slurm job after a USR1 stop; returns True when requeued.

    Only in jobs rendered by bigft (BIGFT_REQUEUE=1), only on the main process of node 0
    (one request per job), and only while SLURM_RESTART_COUNT is below slurm.max_restarts.
    SIGTERM (scancel, time limit, Slurm's own preemption) is not requeued here: Slurm
    decides those, and requeueing a cancelled job would undo the user's scancel.
    """
    env = os.environ
    stopped = summary.get("stopped")
    if stopped not in (REQUEUE_SIGNAL, "signal on another process"):
        return False
    if not env.get("SLURM_JOB_ID") or env.get("BIGFT_REQUEUE") != "1":
        return False
    if env.get("SLURM_NODEID", "0") != "0" or env.get("LOCAL_RANK", "0") != "0":
        return False
    say = console.print if console is not None else print
    restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
    limit = int(env.get("BIGFT_MAX_RESTARTS") or 0)
    if restarts >= limit:
        say(f"bigft: not requeueing: restart {restarts} reached slurm.max_restarts = {limit}")
        return False
    done = _slurm("scontrol", "requeue", env["SLURM_JOB_ID"])
    if done.returncode != 0:
        say(f"bigft: scontrol requeue failed: {(done.stderr or done.stdout).strip()}")
        return False
    say(f"bigft: job {env['SLURM_JOB_ID']} requeued; it resumes from the checkpoint")
    return True
