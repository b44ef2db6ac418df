"""What the command modules share: the consoles, the user-error wrapper and the argument
declarations. Imports no other command module, so each of them can import it at the top.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from bigft._compat import quiet_upstream_noise
from bigft.errors import BigftError

quiet_upstream_noise()  # before any command imports deepspeed, bitsandbytes or torch

UNWRAPPED_WIDTH = 10_000  # columns of a console writing to a file: no line is that long


def _console(stderr: bool = False) -> Console:
    """A rich console. Written to a file (a Slurm log, nohup, CI) instead of a terminal,
    it does not wrap lines at rich's 80 columns: tables keep their natural width and
    text its lines (unless COLUMNS is set)."""
    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.soft_wrap = True
        console.width = UNWRAPPED_WIDTH
    return console


console = _console(stderr=True)
out = _console()

F = TypeVar("F", bound=Callable[..., Any])

CONFIG_ARG = typer.Argument(..., help="YAML config file.", show_default=False)
OVERRIDES_ARG = typer.Argument(
    None, help="Dotted overrides, e.g. optim.lr=1e-4 train.steps=100.", show_default=False
)


def checked_overrides(items: list[str] | None) -> list[str]:
    """The command line's overrides; a key given twice is refused (config imported late:
    `bigft --help` stays fast)."""
    from bigft.config_yaml import user_overrides

    return user_overrides(items)


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


def quiet_libraries() -> None:
    """Keep library chatter (progress bars, load reports) out of bigft's own output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
