"""`bigft slurm ...`: the typer commands over the bigft.slurm package.

Errors end as one red line and exit code 2 (`user_errors`, shared with the other commands);
the logic (pydantic, jinja2) is imported inside each command so `bigft --help` stays fast.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import typer

from bigft.commands.common import (
    CONFIG_ARG,
    OVERRIDES_ARG,
    checked_overrides,
    console,
    user_errors,
)
from bigft.errors import BigftError

slurm_app = typer.Typer(
    help="Run on a Slurm cluster: render and submit sbatch jobs, follow them, sweep.",
    no_args_is_help=True,
)

RUN_DIR_ARG = typer.Argument(..., help="The run's output_dir.", show_default=False)
# Flags that override the config's `slurm` section (same names, see bigft/config.py).
NODES = typer.Option(None, "--nodes", "-N", help="Nodes (slurm.nodes).")
GPUS = typer.Option(None, "--gpus-per-node", help="GPUs per node (slurm.gpus_per_node).")
PARTITION = typer.Option(None, "--partition", "-p", help="Partition (slurm.partition).")
TIME = typer.Option(None, "--time", "-t", help="Time limit, e.g. 04:00:00 (slurm.time).")
ACCOUNT = typer.Option(None, "--account", "-A", help="Account (slurm.account).")
QOS = typer.Option(None, "--qos", help="QOS (slurm.qos).")
CONSTRAINT = typer.Option(None, "--constraint", "-C", help="Node features (slurm.constraint).")
EXCLUSIVE = typer.Option(None, "--exclusive/--shared", help="Whole nodes (slurm.exclusive).")
MEM = typer.Option(None, "--mem", help="Memory per node, e.g. 480G (slurm.mem).")
JOB_NAME = typer.Option(None, "--job-name", "-J", help="Job name (slurm.job_name).")
CHECK = typer.Option(False, "--check", help="Validate with `sbatch --test-only`.")
# How `status` words a job's outcome (bigft.slurm.queue.job_status).
OUTCOME_WORDS = {
    "pending": "queued",
    "running": "in progress",
    "completed": "finished",
    "failed": "failed",
    "unknown": "outcome unknown",
}


def _say(message: str) -> None:
    console.print(message, highlight=False, soft_wrap=True)


def _flags(**values: Any) -> dict[str, Any]:
    """The slurm flags given, by config field name; those typer cannot check are checked
    here, so a value sbatch would refuse fails before anything is written."""
    given = {name: value for name, value in values.items() if value is not None}
    mem = given.get("mem")
    # sbatch --mem: a whole number, megabytes unless suffixed K, M, G or T; 0 = all memory.
    if mem is not None and not re.fullmatch(r"\d+[KMGTkmgt]?", mem):
        raise BigftError(
            f"--mem {mem!r}: not a memory size sbatch accepts; use a whole number with an "
            "optional K, M, G or T suffix (megabytes without), e.g. 480G, or 0 for all of "
            "each node's memory"
        )
    return given


@slurm_app.command()
@user_errors
def render(
    config: Path = CONFIG_ARG,
    overrides: list[str] | None = OVERRIDES_ARG,
    nodes: int | None = NODES,
    gpus_per_node: int | None = GPUS,
    partition: str | None = PARTITION,
    time: str | None = TIME,
    account: str | None = ACCOUNT,
    qos: str | None = QOS,
    constraint: str | None = CONSTRAINT,
    exclusive: bool | None = EXCLUSIVE,
    mem: str | None = MEM,
    job_name: str | None = JOB_NAME,
    check: bool = CHECK,
) -> None:
    """Write the sbatch script into OUTPUT_DIR/slurm/ and print it (nothing is submitted)."""
    from bigft.slurm.job import load_job_config, prepare_job
    from bigft.slurm.queue import check_script

    flags = _flags(
        nodes=nodes, gpus_per_node=gpus_per_node, partition=partition, time=time,
        account=account, qos=qos, constraint=constraint, exclusive=exclusive, mem=mem,
        job_name=job_name,
    )  # fmt: skip
    cfg = load_job_config(config, checked_overrides(overrides), flags)
    script = prepare_job(cfg, config)
    sys.stdout.write(script.read_text())
    _say(f"[green]wrote[/] {script}")
    if check:
        _say(f"[green]sbatch --test-only[/]: {check_script(script)}")


@slurm_app.command()
@user_errors
def submit(
    config: Path = CONFIG_ARG,
    overrides: list[str] | None = OVERRIDES_ARG,
    nodes: int | None = NODES,
    gpus_per_node: int | None = GPUS,
    partition: str | None = PARTITION,
    time: str | None = TIME,
    account: str | None = ACCOUNT,
    qos: str | None = QOS,
    constraint: str | None = CONSTRAINT,
    exclusive: bool | None = EXCLUSIVE,
    mem: str | None = MEM,
    job_name: str | None = JOB_NAME,
) -> None:
    """Render the sbatch script, submit it, and keep script and job id in the run dir."""
    from bigft.slurm.job import load_job_config, prepare_job, secret_env
    from bigft.slurm.queue import submit_script

    flags = _flags(
        nodes=nodes, gpus_per_node=gpus_per_node, partition=partition, time=time,
        account=account, qos=qos, constraint=constraint, exclusive=exclusive, mem=mem,
        job_name=job_name,
    )  # fmt: skip
    cfg = load_job_config(config, checked_overrides(overrides), flags)
    script = prepare_job(cfg, config)
    job_id = submit_script(script, script.parent, secrets=secret_env(cfg.slurm))
    print(job_id)
    _say(
        f"[green]submitted[/] job {job_id}: {script}\n"
        f"log: {script.parent}/job-{job_id}.out · follow: bigft slurm status {cfg.output_dir}"
    )


@slurm_app.command()
@user_errors
def status(run_dir: Path = RUN_DIR_ARG) -> None:
    """Show the Slurm state of a submitted run and how far its training got.

    Exits with 1 when the job failed (FAILED, CANCELLED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL,
    ... or it ended before training finished), and then shows the end of its log.
    """
    from bigft.slurm.queue import job_status

    found = job_status(run_dir)
    progress = found["progress"]
    if not found["states"]:
        print(f"job {found['job_id']}: no longer known to Slurm (finished long ago?)")
    for job_id, info in sorted(found["states"].items()):
        shown = " ".join(f"{k}={v}" for k, v in info.items() if v)
        print(f"job {job_id}: {shown}")
    outcome = found["outcome"]
    done = OUTCOME_WORDS[outcome] + (f": {found['why']}" if found["why"] else "")
    print(f"training: step {progress['step']} ({done})")
    if "eval_loss" in progress:
        print(f"final eval_loss: {progress['eval_loss']:.4f}")
    log = found["log"]
    if outcome != "failed" or not log.is_file():
        print(f"log: {log}")
    else:
        print(f"end of the log, {log}:")
        for line in log.read_text(errors="replace").splitlines()[-10:]:
            print(f"  {line}")
    if outcome == "failed":
        raise typer.Exit(1)


@slurm_app.command()
@user_errors
def sweep(
    config: Path = CONFIG_ARG,
    overrides: list[str] | None = OVERRIDES_ARG,
    grid: list[str] = typer.Option(
        ..., "--grid", "-g", help="key=v1,v2,...; repeat for a product grid."
    ),
    max_parallel: int | None = typer.Option(
        None, "--max-parallel", help="Array tasks running at once (--array=...%K)."
    ),
    nodes: int | None = NODES,
    gpus_per_node: int | None = GPUS,
    partition: str | None = PARTITION,
    time: str | None = TIME,
    account: str | None = ACCOUNT,
    qos: str | None = QOS,
    dry_run: bool = typer.Option(False, "--dry-run", help="Render and print; don't submit."),
) -> None:
    """Submit one job array: one task, run directory and resolved config per grid point."""
    from bigft.slurm.job import load_job_config, secret_env
    from bigft.slurm.queue import submit_script
    from bigft.slurm.sweep import prepare_sweep

    if max_parallel is not None and max_parallel < 1:
        raise BigftError(f"--max-parallel {max_parallel}: must be at least 1")
    flags = _flags(
        nodes=nodes, gpus_per_node=gpus_per_node, partition=partition, time=time,
        account=account, qos=qos,
    )  # fmt: skip
    overrides = checked_overrides(overrides)
    script, n = prepare_sweep(config, overrides, grid, flags, max_parallel)
    if dry_run:
        sys.stdout.write(script.read_text())
        _say(f"[green]wrote[/] {script} ({n} tasks); not submitted")
        return
    base = load_job_config(config, overrides, flags)
    job_id = submit_script(script, script.parent, array_size=n, secrets=secret_env(base.slurm))
    print(job_id)
    _say(f"[green]submitted[/] array job {job_id} with {n} tasks: {script}")


@slurm_app.command("sweep-status")
@user_errors
def sweep_status(run_dir: Path = RUN_DIR_ARG) -> None:
    """One line per sweep task: its overrides, Slurm state, step and final eval loss."""
    from rich.console import Console
    from rich.table import Table

    from bigft.slurm.sweep import sweep_rows

    table = Table("task", "overrides", "state", "step", "eval_loss", "output_dir")
    rows = sweep_rows(run_dir)
    for row in sorted(rows, key=lambda r: r.get("eval_loss", float("inf"))):
        loss = row.get("eval_loss")
        table.add_row(
            row["job_id"],
            " ".join(row["overrides"]),
            row["state"],
            str(row["step"]),
            f"{loss:.4f}" if loss is not None else "",
            row["output_dir"],
        )
    Console().print(table)
