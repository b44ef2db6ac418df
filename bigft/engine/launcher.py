"""How bigft starts its worker processes: torchrun on this node, or a Slurm job's nodes.

Workers run `python -m bigft`, which puts the working directory first on sys.path; a
folder named `bigft` there (a checkout's parent directory, a stale copy) would replace
the installed package. Workers start with that directory left out (PYTHONSAFEPATH=1),
and a bigft that is an uninstalled checkout is handed to them through PYTHONPATH.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bigft.errors import BigftError


def isolated_workers(cwd: Path, version: tuple[int, int]) -> tuple[list[str], dict[str, str]]:
    """(interpreter flags for torchrun, environment for its workers) so that every worker's
    `python -m bigft` imports the bigft running here.

    `python -m` puts the working directory first on sys.path, so a folder named `bigft`
    there (a checkout's parent directory, a stale copy) would replace the installed
    package in every worker. Python 3.11+ leaves it out under -P / PYTHONSAFEPATH=1; the
    workers inherit the variable. Python 3.10 cannot, so a launch from such a directory
    is refused instead.
    """
    import bigft

    package = Path(bigft.__file__).resolve().parent
    if version < (3, 11):
        for shadow in (cwd / "bigft", cwd / "bigft.py"):
            if shadow.exists() and shadow.resolve() != package:
                raise BigftError(
                    f"{shadow} would be imported by the workers' `python -m bigft` instead of "
                    f"bigft in {package.parent} (Python {version[0]}.{version[1]} cannot leave "
                    "the working directory out; 3.11+ can): start bigft launch from another "
                    "directory"
                )
        return [], {}
    env = {"PYTHONSAFEPATH": "1"}
    checkout = checkout_on_path()
    if checkout is not None:
        inherited = os.environ.get("PYTHONPATH")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(checkout), inherited]))
    return ["-P"], env


def checkout_on_path() -> Path | None:
    """The directory holding the running bigft when it is importable only because `python
    -m` (or a script) put the working directory first on sys.path: an uninstalled
    checkout run from its root. None for an installed bigft. A process started with
    PYTHONSAFEPATH=1 finds such a checkout only through PYTHONPATH."""
    import bigft

    root = Path(bigft.__file__).resolve().parents[1]
    first = Path(sys.path[0] or ".").resolve() if sys.path and not sys.flags.safe_path else None
    return root if root in (first, Path.cwd().resolve()) else None
