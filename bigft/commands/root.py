"""`bigft` itself: the root typer app, its commands and `main()`, the console script.

Heavy libraries (torch, transformers, datasets) are imported inside the commands that
need them, so `bigft --help` and `bigft config show` start instantly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from bigft import __version__
from bigft._compat import click_exceptions
from bigft.commands.common import (
    CONFIG_ARG,
    OVERRIDES_ARG,
    checked_overrides,
    console,
    out,
    quiet_libraries,
    user_errors,
)
from bigft.commands.compress import FORMATS_HELP, export_quantized, prune
from bigft.commands.data import data_app
from bigft.commands.plan import plan  # imports no torch: --simulate does, when run
from bigft.commands.slurm import slurm_app
from bigft.errors import BigftError

_usage = click_exceptions()


class _OneLineUsageErrors(typer.core.TyperGroup):
    """Usage mistakes (an unknown option, a flag value of the wrong type) end like every
    other user error: one `error:` line and exit code 2, not click's usage box."""

    def main(  # type: ignore[override]
        self,
        args: list[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except _usage.NoArgsIsHelpError as exc:  # `bigft` alone: the help
            from typer import rich_utils

            rich_utils.rich_format_error(exc)
            sys.exit(exc.exit_code)
        except _usage.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "bigft"
            message = escape(exc.format_message())
            console.print(
                f"[bold red]error:[/] {message} (see {where} --help)",
                highlight=False,
                soft_wrap=True,
            )
            sys.exit(exc.exit_code)
        except _usage.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except typer.Abort:
            console.print("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    help="bigft: plan, fine-tune, evaluate and export large language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show and check configs.")
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
app.add_typer(slurm_app, name="slurm")


def _version(value: bool) -> None:
    if value:
        out.print(f"bigft {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """bigft: plan, fine-tune, evaluate and export large language models."""


OVERWRITE_OPT = typer.Option(
    False,
    "--overwrite",
    help="output_dir holds a previous run: move it aside (renamed, nothing deleted) and "
    "start afresh, instead of continuing it or refusing.",
)


@app.command()
@user_errors
def train(
    config: Path = CONFIG_ARG,
    overrides: list[str] | None = OVERRIDES_ARG,
    overwrite: bool = OVERWRITE_OPT,
) -> None:
    """Fine-tune as the config says: validate, train, evaluate, export."""
    import shlex

    from bigft.config_io import load_config

    cfg = load_config(config, checked_overrides(overrides))
    from bigft.engine.accelerator import require_launcher

    args = [str(config), *checked_overrides(overrides), *(["--overwrite"] if overwrite else [])]
    require_launcher(cfg.parallel.strategy, shlex.join(args))
    quiet_libraries()
    from bigft.loop.train import run_training

    summary = run_training(cfg, console, overwrite)
    if "final_model" in summary and os.environ.get("RANK", "0") == "0":
        console.print(f"[green]done[/]: model exported to {summary['final_model']}")
    from bigft.slurm.queue import after_stop

    after_stop(summary, console)  # under Slurm: requeue after a USR1 stop


@config_app.command("show")
@user_errors
def config_show(config: Path = CONFIG_ARG, overrides: list[str] | None = OVERRIDES_ARG) -> None:
    """Print the fully resolved config (defaults filled in, overrides applied, paths
    absolute)."""
    from bigft.config_io import load_config, show_config

    cfg = load_config(config, checked_overrides(overrides))
    out.print(show_config(cfg, config), highlight=False, end="", markup=False, soft_wrap=True)


@app.command(context_settings={"allow_extra_args": False})
@user_errors
def launch(
    config: Path = CONFIG_ARG,
    overrides: list[str] | None = OVERRIDES_ARG,
    nproc: int = typer.Option(1, "--nproc", help="Processes on this node (one per GPU)."),
    nnodes: int = typer.Option(1, "--nnodes", envvar="SLURM_NNODES", help="Nodes in the job."),
    node_rank: int = typer.Option(
        0, "--node-rank", envvar="SLURM_NODEID", help="This node's rank."
    ),
    master_addr: str = typer.Option(
        "127.0.0.1", "--master-addr", envvar="MASTER_ADDR", help="Rendezvous host."
    ),
    master_port: int = typer.Option(
        29500, "--master-port", envvar="MASTER_PORT", help="Rendezvous port."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the command, run nothing."),
    overwrite: bool = OVERWRITE_OPT,
) -> None:
    """Start `bigft train` on N processes per node through torchrun (c10d rendezvous)."""
    import shlex
    import subprocess

    from bigft.config_io import load_config
    from bigft.engine.launcher import isolated_workers

    _check_launch_flags(nproc, nnodes, node_rank, master_port)
    load_config(config, checked_overrides(overrides))  # fail here, once, not in every process
    python_flags, worker_env = isolated_workers(Path.cwd(), sys.version_info[:2])
    cmd = [sys.executable, *python_flags, "-m", "torch.distributed.run"]
    cmd.append(f"--nproc_per_node={nproc}")
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [
            f"--nnodes={nnodes}",
            f"--node_rank={node_rank}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={master_addr}:{master_port}",
            "--rdzv_id=bigft",
        ]
    cmd += ["-m", "bigft", "train", str(config), *checked_overrides(overrides)]
    cmd += ["--overwrite"] if overwrite else []
    console.print(f"[dim]$ {shlex.join(cmd)}[/]", highlight=False, soft_wrap=True)
    if dry_run:
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **worker_env}
    code = subprocess.call(cmd, env=env)
    if code:
        raise typer.Exit(code)


def _check_launch_flags(nproc: int, nnodes: int, node_rank: int, master_port: int) -> None:
    """Refuse values torchrun would reject with a traceback, or (node rank) hang on."""
    if nproc < 1:
        raise BigftError(f"--nproc {nproc}: must be at least 1 (processes on this node)")
    if nnodes < 1:
        raise BigftError(f"--nnodes {nnodes}: must be at least 1")
    if not 0 <= node_rank < nnodes:
        raise BigftError(
            f"--node-rank {node_rank}: must be from 0 to {nnodes - 1} (--nnodes {nnodes}); "
            "each node of the job passes its own rank"
        )
    if not 1 <= master_port <= 65535:
        raise BigftError(f"--master-port {master_port}: must be a TCP port from 1 to 65535")


@app.command()
@user_errors
def demo(
    output_dir: Path = typer.Option(Path("runs/demo"), "--output-dir", "-o", help="Run directory."),
    overrides: list[str] | None = OVERRIDES_ARG,
) -> None:
    """Tiny end-to-end fine-tune on CPU: make a base model, train, evaluate, export."""
    quiet_libraries()
    from bigft.demo import run_demo

    run_demo(output_dir, checked_overrides(overrides), console)


@app.command("eval")
@user_errors
def eval_(
    target: Path = typer.Argument(
        ..., help="A run directory (scores RUN/final) or a model directory.", show_default=False
    ),
    data: str | None = typer.Option(
        None, "--data", help="Rows to score (any data.train format); default: the run's splits."
    ),
    task: str | None = typer.Option(
        None, "--task", help="causal_lm, classification or regression (model directories)."
    ),
    overrides: list[str] | None = OVERRIDES_ARG,
) -> None:
    """Score a trained model without training: loss / perplexity, exact match, or
    accuracy / macro-F1 / AUC / confusion matrix; prints JSON."""
    import json

    from bigft.eval.standalone import evaluation_job

    with evaluation_job(target, data, task, checked_overrides(overrides)) as job:
        quiet_libraries()
        from bigft.eval.standalone import run_evaluation

        results = run_evaluation(job, console)
    if os.environ.get("RANK", "0") == "0":
        out.print_json(json.dumps(results, default=str))


@app.command("export")
@user_errors
def export(
    run_dir: Path = typer.Argument(..., help="Run directory (its output_dir).", show_default=False),
    out_dir: Path = typer.Option(
        ..., "--out", "-o", help="Directory to write.", show_default=False
    ),
    merge: bool = typer.Option(
        False, "--merge", help="Merge the adapter into the base (QLoRA: dequantized first)."
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace an existing --out that is not a bigft export (never the run's own "
        "directory or a folder holding it).",
    ),
    quantize: str | None = typer.Option(None, "--quantize", "-q", help=FORMATS_HELP),
) -> None:
    """Export a run's final model: the adapter as is, merged into a full model, or
    quantized (scored before and after on the run's test split)."""
    if quantize is not None:
        return export_quantized(run_dir, out_dir, quantize, merge, overwrite)
    quiet_libraries()
    from bigft.model.export import export_run

    try:
        existed = out_dir.expanduser().is_dir() and any(out_dir.expanduser().iterdir())
    except OSError:
        existed = False  # a path the file system refuses: export_run says why
    written = export_run(run_dir, out_dir, merge=merge, overwrite=overwrite)
    note = " (its previous contents were replaced)" if existed else ""
    console.print(f"[green]exported[/] {written}{note}")


app.command("plan")(plan)
app.command("prune")(prune)


@app.command("report")
@user_errors
def report(
    run_dir: Path = typer.Argument(..., help="Run directory (its output_dir).", show_default=False),
    out_dir: Path | None = typer.Option(
        None, "--out", "-o", help="Directory to write; default: RUN_DIR/report."
    ),
) -> None:
    """Plot a run's metrics and write report.md: final and best evaluations, throughput."""
    from bigft.report.render import write_report

    out.print(str(write_report(run_dir, out_dir)), highlight=False, soft_wrap=True)


@app.command("compare")
@user_errors
def compare(
    run_dirs: list[Path] = typer.Argument(
        ..., help="Two or more run directories.", show_default=False
    ),
    out_dir: Path = typer.Option(Path("compare"), "--out", "-o", help="Directory to write."),
    metric: str = typer.Option(
        "eval_loss", "--metric", "-m", help="Evaluation metric to overlay and rank runs by."
    ),
) -> None:
    """Compare runs: results and config differences side by side, overlaid curves."""
    from bigft.report.render import compare_runs

    written = compare_runs(run_dirs, out_dir, metric, out)
    out.print(f"wrote {' and '.join(map(str, written))}", highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="bigft")
    sys.exit(0)
