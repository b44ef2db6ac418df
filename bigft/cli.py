"""Command line: the only reader of sys.argv.

Heavy libraries (torch, transformers, datasets) are imported inside the commands that
need them, so `bigft --help` and `bigft config show` start instantly.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from bigft import __version__
from bigft.errors import BigftError
from bigft.plan.cli import plan as _plan  # imports no torch: --simulate does, when run
from bigft.slurm_cli import slurm_app

app = typer.Typer(
    help="bigft: plan, fine-tune, evaluate and export large language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect what the data pipeline makes of a config's data.")
config_app = typer.Typer(help="Show and check configs.")
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
app.add_typer(slurm_app, name="slurm")

console = Console(stderr=True)
out = Console()

F = TypeVar("F", bound=Callable[..., Any])

CONFIG_ARG = typer.Argument(..., help="YAML config file.", show_default=False)
OVERRIDES_ARG = typer.Argument(
    None, help="Dotted overrides, e.g. optim.lr=1e-4 train.steps=100.", show_default=False
)


def user_errors(func: F) -> F:
    """Turn user mistakes into one red line and exit code 2, with no traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except BigftError as exc:
            # escaped: messages hold brackets that are not markup, e.g. pip install 'bigft[lora]'
            message = escape(str(exc))
            console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _quiet_libraries() -> None:
    """Keep library chatter (progress bars, load reports) out of bigft's own output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


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
    from bigft.config import load_config

    cfg = load_config(config, overrides or [])
    _quiet_libraries()
    from bigft.train import run_training

    summary = run_training(cfg, console, overwrite)
    if "final_model" in summary and os.environ.get("RANK", "0") == "0":
        console.print(f"[green]done[/]: model exported to {summary['final_model']}")
    from bigft.slurm import after_stop

    after_stop(summary, console)  # under Slurm: requeue after a USR1 stop


@data_app.command("preview")
@user_errors
def data_preview(
    config: Path = CONFIG_ARG,
    overrides: list[str] | None = OVERRIDES_ARG,
    num: int = typer.Option(3, "--num", "-n", help="Examples to show."),
) -> None:
    """Show formatted + tokenized examples (masked prompt dimmed) and data statistics."""
    from bigft.config import load_config

    cfg = load_config(config, overrides or [])
    _quiet_libraries()
    from bigft.data import prepare_data
    from bigft.data.preview import preview
    from bigft.model import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    prepared = prepare_data(cfg.data, tokenizer, cfg.train.seq_len, cfg.train.seed)
    preview(prepared, tokenizer, out, n=num)


@config_app.command("show")
@user_errors
def config_show(config: Path = CONFIG_ARG, overrides: list[str] | None = OVERRIDES_ARG) -> None:
    """Print the fully resolved config (defaults filled in, overrides applied)."""
    from bigft.config import dump_config, load_config

    out.print(dump_config(load_config(config, overrides or [])), highlight=False, end="")


@app.command(context_settings={"allow_extra_args": False})
@user_errors
def launch(
    config: Path = CONFIG_ARG,
    overrides: list[str] | None = OVERRIDES_ARG,
    nproc: int = typer.Option(1, "--nproc", help="Processes on this node (one per GPU)."),
    nnodes: int = typer.Option(
        int(os.environ.get("SLURM_NNODES", "1")), "--nnodes", help="Nodes in the job."
    ),
    node_rank: int = typer.Option(
        int(os.environ.get("SLURM_NODEID", "0")), "--node-rank", help="This node's rank."
    ),
    master_addr: str = typer.Option(
        os.environ.get("MASTER_ADDR", "127.0.0.1"), "--master-addr", help="Rendezvous host."
    ),
    master_port: int = typer.Option(
        int(os.environ.get("MASTER_PORT", "29500")), "--master-port", help="Rendezvous port."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the command, run nothing."),
    overwrite: bool = OVERWRITE_OPT,
) -> None:
    """Start `bigft train` on N processes per node through torchrun (c10d rendezvous)."""
    import shlex
    import subprocess

    from bigft.config import load_config

    load_config(config, overrides or [])  # fail here, once, not in every process
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
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
    cmd += ["-m", "bigft", "train", str(config), *(overrides or [])]
    cmd += ["--overwrite"] if overwrite else []
    console.print(f"[dim]$ {shlex.join(cmd)}[/]", highlight=False, soft_wrap=True)
    if dry_run:
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    code = subprocess.call(cmd, env=env)
    if code:
        raise typer.Exit(code)


@app.command()
@user_errors
def demo(
    output_dir: Path = typer.Option(Path("runs/demo"), "--output-dir", "-o", help="Run directory."),
    overrides: list[str] | None = OVERRIDES_ARG,
) -> None:
    """Tiny end-to-end fine-tune on CPU: make a base model, train, evaluate, export."""
    _quiet_libraries()
    from bigft.demo import run_demo

    run_demo(output_dir, overrides or [], console)


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

    from bigft.evaluation import evaluation_config

    cfg, splits = evaluation_config(target, data, task, overrides or [])
    _quiet_libraries()
    from bigft.evaluation import run_evaluation

    results = run_evaluation(cfg, splits, console)
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
) -> None:
    """Export a run's final model: the adapter as is, or merged into a full model."""
    _quiet_libraries()
    from bigft.export import export_run

    existed = out_dir.expanduser().is_dir() and any(out_dir.expanduser().iterdir())
    written = export_run(run_dir, out_dir, merge=merge, overwrite=overwrite)
    note = " (its previous contents were replaced)" if existed else ""
    console.print(f"[green]exported[/] {written}{note}")


app.command("plan")(user_errors(_plan))


@app.command("report")
@user_errors
def report(
    run_dir: Path = typer.Argument(..., help="Run directory (its output_dir).", show_default=False),
    out_dir: Path | None = typer.Option(
        None, "--out", "-o", help="Directory to write; default: RUN_DIR/report."
    ),
) -> None:
    """Plot a run's metrics and write report.md: final and best evaluations, throughput."""
    from bigft.report import write_report

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
    from bigft.report import compare_runs

    written = compare_runs(run_dirs, out_dir, metric, out)
    out.print(f"wrote {' and '.join(map(str, written))}", highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="bigft")
    sys.exit(0)
