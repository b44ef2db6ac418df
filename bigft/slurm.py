"""Slurm: render an sbatch script from the config, submit it, follow it, sweep, requeue.

A job is prepared in `<output_dir>/slurm/`: the resolved config it trains (frozen, so
editing the YAML later changes nothing in a queued job), a copy of the per-node entry
script (`node.sh`), of the accelerate config if one is used (`accelerate.yaml`), the
rendered `job.sbatch`, `job.json` (job ids) and the job's log. A sweep adds
`configs/task-NNN.yaml` and `sweep.json`, and trains task i into `<output_dir>/task-NNN/`.

The template, the node script and the accelerate configs are installed with bigft, in
`bigft/templates/` (read through importlib.resources); `slurm/` and `launch/` at the top of
the repository hold identical copies for reading.

This module must not import torch: `bigft --help` imports it.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from bigft import __version__
from bigft.config import Config, SlurmConfig
from bigft.config_io import dump_config, is_secret_name, load_config, parse_override
from bigft.errors import BigftError, ConfigError
from bigft.launcher import checkout_on_path
from bigft.tracking import read_metrics

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

TEMPLATE = "slurm/job.sbatch.j2"
NODE_SCRIPT = "launch/slurm_node.sh"
ACCELERATE_CONFIGS = "launch/accelerate"
# The signal asked for with --signal; a stop caused by it means "requeue me".
REQUEUE_SIGNAL = "SIGUSR1"


def shipped(path: str) -> Traversable:
    """A file installed with bigft: `bigft/templates/<path>`, e.g. 'launch/slurm_node.sh'."""
    found = resources.files("bigft") / "templates"
    for part in path.split("/"):
        found = found / part
    return found


def _read_shipped(path: str) -> str:
    try:
        return shipped(path).read_text()
    except OSError:
        raise BigftError(f"bigft is missing its file {path} (reinstall bigft)") from None


def sbatch_quote(value: object) -> str:
    """One #SBATCH argument: double-quoted, with backslash and quote escaped.

    sbatch reads #SBATCH lines itself (no shell): it honours "..." and backslash escapes,
    so this is enough for spaces, quotes, `$()`, backticks and `;`. Line breaks would
    start a new line of shell script; config validation rejects them, and so does this.
    """
    text = str(value)
    if any(c in text for c in "\n\r\0"):
        raise ConfigError(f"sbatch value {text!r} contains a line break")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _slurm_filename(path: Path) -> str:
    """A path for --output: '%' is Slurm's pattern character, so a literal one is '%%'."""
    return str(path).replace("%", "%%")


def time_seconds(limit: str) -> int | None:
    """Seconds in a Slurm time limit ('MM', 'HH:MM:SS', 'D-HH:MM' ...); None if unlimited."""
    if limit.upper() in ("INFINITE", "UNLIMITED"):
        return None
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        parts += [0] * (3 - len(parts))
        return int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    if len(parts) == 1:  # minutes
        return parts[0] * 60
    if len(parts) == 2:  # minutes:seconds
        return parts[0] * 60 + parts[1]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def cpus_per_task(s: SlurmConfig) -> int | None:
    """--cpus-per-task of the one task per node, which runs all of the node's ranks.

    slurm.cpus_per_task if set; else, with GPUs, ranks x slurm.cpus_per_gpu (ranks:
    processes_per_node, default gpus_per_node); else one CPU per rank when
    processes_per_node is set. Without it Slurm would give the task one CPU, and on a
    cluster that binds tasks to their CPUs every rank of the node would share it.
    """
    if s.cpus_per_task is not None:
        return s.cpus_per_task
    if s.gpus_per_node:
        return (s.processes_per_node or s.gpus_per_node) * s.cpus_per_gpu
    return s.processes_per_node


def find_accelerate_config(value: str, config_dir: Path) -> Path | Traversable:
    """The file slurm.accelerate_config names: a path (relative ones from the config's
    directory), else one of the accelerate configs bigft ships, by name ('zero3',
    'zero3.yaml') or by its path in the repository ('launch/accelerate/zero3.yaml')."""
    path = Path(value).expanduser()
    local = path if path.is_absolute() else config_dir / path
    if local.is_file():
        return local
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    candidate = shipped(f"{ACCELERATE_CONFIGS}/{name}")
    known = value in (path.name, f"{ACCELERATE_CONFIGS}/{name}")
    if known and candidate.is_file():
        return candidate
    names = sorted(f.name.removesuffix(".yaml") for f in shipped(ACCELERATE_CONFIGS).iterdir())
    raise ConfigError(
        f"slurm.accelerate_config: {value} not found (relative paths are read from "
        f"{config_dir}); or name one that bigft ships: {', '.join(names)}"
    )


def job_env(s: SlurmConfig, accelerate_config: str | None = None) -> list[tuple[str, str | None]]:
    """Environment exported by the batch script: NCCL knobs, slurm.env, launch settings.

    `accelerate_config` is the job's copy of slurm.accelerate_config. A secret (see
    `secret_env`) has no value here: the script reads it from the job's environment, so
    it is never written to a file.
    """
    env: list[tuple[str, str | None]] = []
    if s.nccl_socket_ifname:
        env += [("NCCL_SOCKET_IFNAME", s.nccl_socket_ifname)]
        env += [("GLOO_SOCKET_IFNAME", s.nccl_socket_ifname)]
    if s.nccl_ib_disable is not None:
        env.append(("NCCL_IB_DISABLE", "1" if s.nccl_ib_disable else "0"))
    if s.nccl_debug:
        env.append(("NCCL_DEBUG", s.nccl_debug))
    if s.nccl_heartbeat_timeout_s:
        env.append(("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", str(s.nccl_heartbeat_timeout_s)))
    exported = dict(s.env)
    checkout = checkout_on_path()
    if checkout is not None:
        # Jobs start Python with PYTHONSAFEPATH=1 (slurm_node.sh): an uninstalled checkout
        # reaches them only through PYTHONPATH, as an install would through site-packages.
        inherited = exported.get("PYTHONPATH", "").split(os.pathsep)
        exported["PYTHONPATH"] = os.pathsep.join([str(checkout), *filter(None, inherited)])
    env += [(k, None if is_secret_name(k) else v) for k, v in sorted(exported.items())]
    env += [
        ("BIGFT_PYTHON", s.python or sys.executable),
        ("BIGFT_LAUNCHER", s.launcher),
        ("BIGFT_RDZV_TIMEOUT", str(s.rdzv_timeout_s)),
        ("BIGFT_REQUEUE", "1" if s.requeue else "0"),
        ("BIGFT_MAX_RESTARTS", str(s.max_restarts)),
    ]
    if s.processes_per_node:
        env.append(("BIGFT_NPROC_PER_NODE", str(s.processes_per_node)))
    if s.master_port:
        env.append(("BIGFT_MASTER_PORT", str(s.master_port)))
    if accelerate_config:
        env.append(("BIGFT_ACCELERATE_CONFIG", accelerate_config))
    return env


def render_script(
    cfg: Config,
    *,
    source: str,
    config: str,
    node_script: str,
    log_path: str,
    accelerate_config: str | None = None,
    array: str | None = None,
    configs_dir: str | None = None,
) -> str:
    """The sbatch script text for `cfg` (pure: reads the template, writes nothing)."""
    import jinja2

    s = cfg.slurm
    if s.time and s.signal_seconds:
        limit = time_seconds(s.time)
        if limit is not None and s.signal_seconds >= limit:
            raise ConfigError(
                f"slurm.signal_seconds ({s.signal_seconds}) must be shorter than slurm.time "
                f"({s.time} = {limit} s)"
            )
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["q"] = lambda value: shlex.quote(str(value))
    env.filters["sbatch"] = sbatch_quote
    values = {
        **s.model_dump(),
        "version": __version__,
        "source": source,
        "job_name": s.job_name or Path(cfg.output_dir).name or "bigft",
        "cpus_per_task": cpus_per_task(s),
        "env": job_env(s, accelerate_config),
        "config": config,
        "node_script": node_script,
        "log_path": log_path,
        "array": array,
        "configs_dir": configs_dir,
    }
    return env.from_string(_read_shipped(TEMPLATE)).render(**values)


# ---------------------------------------------------------------------------------------
# Preparing, checking and submitting jobs.


def load_job_config(
    config: Path, overrides: list[str], flags: dict[str, Any] | None = None
) -> Config:
    """Load a config with absolute paths (the job runs elsewhere) and apply slurm flags."""
    cfg = load_config(config.resolve(), overrides)
    cfg.output_dir = str(Path(cfg.output_dir).resolve())
    for name, value in (flags or {}).items():
        if value is None:
            continue
        try:
            setattr(cfg.slurm, name, value)
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ConfigError(f"--{name.replace('_', '-')}: {msg} (got {value!r})") from None
    return cfg


def launch_files(s: SlurmConfig, config_dir: Path) -> dict[str, str]:
    """What each node runs besides the config: the node script (`node.sh`) and, when
    slurm.accelerate_config is set, that file (`accelerate.yaml`), copied into the job."""
    files = {"node.sh": _read_shipped(NODE_SCRIPT)}
    if s.accelerate_config:
        source = find_accelerate_config(s.accelerate_config, config_dir)
        files["accelerate.yaml"] = source.read_text()
    return files


def _write_job_files(job_dir: Path, files: dict[str, str]) -> None:
    """Write the job's files, after everything was rendered and validated."""
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (job_dir / name).parent.mkdir(exist_ok=True)
            (job_dir / name).write_text(text)
    except OSError as exc:
        raise BigftError(f"cannot write the job files in {job_dir} ({exc.strerror})") from None


def prepare_job(cfg: Config, source: Path) -> Path:
    """Render `job.sbatch`, then write it with the frozen config, the node script and the
    accelerate config into `<output_dir>/slurm/`; returns the script's path."""
    job_dir = Path(cfg.output_dir) / "slurm"
    files = launch_files(cfg.slurm, source.resolve().parent)
    files["job.sbatch"] = render_script(
        cfg,
        source=str(source),
        config=str(job_dir / "config.yaml"),
        node_script=str(job_dir / "node.sh"),
        log_path=_slurm_filename(job_dir) + "/job-%j.out",
        accelerate_config=str(job_dir / "accelerate.yaml") if "accelerate.yaml" in files else None,
    )
    _write_job_files(job_dir, {**files, "config.yaml": dump_config(cfg)})
    return job_dir / "job.sbatch"


def secret_env(s: SlurmConfig) -> dict[str, str]:
    """slurm.env entries that hold credentials (WANDB_API_KEY, HF_TOKEN, ...: a name part
    ending in KEY, TOKEN, SECRET or PASSWORD). They are kept out of the job files; `submit`
    hands them to sbatch in its environment, which sbatch passes on to the job."""
    return {k: v for k, v in s.env.items() if is_secret_name(k)}


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


# ---------------------------------------------------------------------------------------
# Sweeps: one job array, one resolved config and run directory per grid point.


def _grid_value(key: str, text: str) -> tuple[str, Any]:
    """A grid value as the config will read it, so `1e-4` and `0.0001` are one value
    (tagged with its kind: `true` and `1` are not)."""
    value = parse_override(f"{key}={text}")[1]
    if isinstance(value, str):
        try:
            value = float(value)  # YAML reads 1e-4 (no dot) as text; the config a float
        except ValueError:
            return "text", value
    if isinstance(value, bool) or value is None:
        return "constant", value
    if isinstance(value, int | float):
        return "number", float(value)
    return "structure", json.dumps(value, sort_keys=True, default=str)


def expand_grid(grids: list[str]) -> list[list[str]]:
    """['optim.lr=1e-4,2e-4', 'train.seed=1,2'] -> the 4 override lists of the product.

    Refused: output_dir (every point trains in its own `<output_dir>/task-NNN`), slurm.*
    (all points run in one job array with one request), a key given twice, a value
    listed twice (two identical runs).
    """
    axes = []
    keys: set[str] = set()
    for item in grids:
        parse_override(item)  # validates the key=value shape
        key, _, values = item.partition("=")
        if key == "output_dir":
            raise ConfigError(
                f"--grid {item}: each grid point already trains in its own run directory "
                "(<output_dir>/task-NNN); set output_dir once, as the sweep's directory"
            )
        if key.split(".")[0] == "slurm":
            raise ConfigError(
                f"--grid {item}: all grid points run in one Slurm job array with one "
                f"request; set {key} once (or submit separate sweeps)"
            )
        if key in keys:
            raise ConfigError(f"--grid {key} is given twice; list all its values in one --grid")
        keys.add(key)
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not choices:
            raise ConfigError(f"--grid {item}: no values (expected key=v1,v2,...)")
        seen: dict[tuple[str, Any], str] = {}
        for choice in choices:
            value = _grid_value(key, choice)
            if value in seen:
                same = "" if seen[value] == choice else f" ({seen[value]} and {choice} are equal)"
                raise ConfigError(
                    f"--grid {item}: {key}={choice} is listed twice{same}; each grid point "
                    "would run twice"
                )
            seen[value] = choice
        axes.append([f"{key}={v}" for v in choices])
    return [list(point) for point in itertools.product(*axes)]


def prepare_sweep(
    config: Path,
    overrides: list[str],
    grids: list[str],
    flags: dict[str, Any],
    max_parallel: int | None = None,
) -> tuple[Path, int]:
    """Validate every grid point's config, write them, render one array script."""
    base = load_job_config(config, overrides, flags)
    job_dir = Path(base.output_dir) / "slurm"
    files, tasks = launch_files(base.slurm, config.resolve().parent), []
    for i, point in enumerate(expand_grid(grids)):
        out = Path(base.output_dir) / f"task-{i:03d}"
        cfg = load_job_config(config, [*overrides, *point, f"output_dir={out}"], flags)
        name = f"configs/task-{i:03d}.yaml"
        files[name] = dump_config(cfg)
        tasks.append({"task": i, "overrides": point, "output_dir": str(out), "config": name})
    files["sweep.json"] = json.dumps({"grid": grids, "tasks": tasks}, indent=2)
    files["job.sbatch"] = render_script(
        base,
        source=str(config),
        config="",
        node_script=str(job_dir / "node.sh"),
        log_path=_slurm_filename(job_dir) + "/job-%A_%a.out",
        accelerate_config=str(job_dir / "accelerate.yaml") if "accelerate.yaml" in files else None,
        array=f"0-{len(tasks) - 1}" + (f"%{max_parallel}" if max_parallel else ""),
        configs_dir=str(job_dir / "configs"),
    )
    _write_job_files(job_dir, files)
    return job_dir / "job.sbatch", len(tasks)


# ---------------------------------------------------------------------------------------
# Following jobs: squeue while queued or running, then sacct (with accounting) or scontrol,
# then (once slurmctld forgot the job, MinJobAge) the job's own log.

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


def sweep_rows(run_dir: Path) -> list[dict[str, Any]]:
    """One row per sweep task: overrides, Slurm state, progress, final eval loss."""
    sweep_path = run_dir / "slurm" / "sweep.json"
    if not sweep_path.is_file():
        raise BigftError(f"{run_dir}: not a sweep ({sweep_path} missing)")
    tasks = json.loads(sweep_path.read_text())["tasks"]
    job = last_job(run_dir)
    states = query_states(job["job_id"])
    rows = []
    for task in tasks:
        task_id = f"{job['job_id']}_{task['task']}"
        state = states.get(task_id, {}).get("state", "?")
        rows.append(
            {**task, "job_id": task_id, "state": state, **run_progress(Path(task["output_dir"]))}
        )
    return rows


# ---------------------------------------------------------------------------------------
# Requeue after a stop (called by `bigft train` when the loop returns).


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
