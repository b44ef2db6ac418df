"""The command line: the typer apps, argument parsing and printing.

`root` holds the `bigft` app and most commands, `slurm` the `bigft slurm` sub-app, `plan`
the `bigft plan` command and `common` what they share (consoles, error handling, argument
declarations). The library below (config, plan, train, ...) never imports from here.
"""

from bigft.commands.root import app, main

__all__ = ["app", "main"]
