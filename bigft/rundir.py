"""The run directory: one run per output_dir, one live process group at a time.

- A directory holding a previous run is continued (`train.resume: auto`) or, when the
  user asks for a fresh start, moved aside whole (`--overwrite`); it is never mixed
  with a new run and nothing in it is deleted.
- The main process holds `output_dir/.bigft.lock` (host, pid, Slurm job) while it runs.
  A second run into the same directory is refused while the holder lives; a lock left by
  a killed process on this host, or by an earlier incarnation of the same Slurm job
  (requeued), is stale and taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from bigft.errors import BigftError

LOCK = ".bigft.lock"
_RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "summary.json", "final")


def resolved(path: Path, what: str) -> Path:
    """`path` made absolute with symlinks followed and `~` expanded; a path the file
    system cannot follow (a symlink loop, a name too long) is the user's to fix."""
    try:
        full = path.expanduser().resolve()
        full.exists()  # raises for what resolve() lets through (a name too long)
        return full
    except RuntimeError:  # Python < 3.13 reports a symlink loop this way
        raise BigftError(f"{what} {path}: a symlink loop; point it at a real directory") from None
    except OSError as exc:
        raise BigftError(f"{what} {path}: {exc.strerror or exc}") from None


def holds_run(path: Path) -> bool:
    """Whether `path` holds a bigft run: its resolved config beside outputs of training."""
    return (path / "config.yaml").is_file() and any((path / o).exists() for o in _RUN_OUTPUTS)


def check_output_dir(out: Path, resume: str, overwrite: bool) -> None:
    """Refuse a directory that a fresh run would silently mix with an earlier one.

    Read-only, so every process can run it and reach the same answer before any acts.
    """
    if out.exists() and not out.is_dir():
        raise BigftError(f"output_dir '{out}' exists and is not a directory")
    if overwrite or not holds_run(out):
        return
    if resume == "never":
        raise BigftError(
            f"output_dir '{out}' holds a previous run; continue it with train.resume=auto, "
            "choose a new output_dir, or pass --overwrite to move the old run aside"
        )
    from bigft.engine.checkpoint import list_checkpoints

    if resume == "auto" and not list_checkpoints(out) and (out / "summary.json").is_file():
        raise BigftError(
            f"output_dir '{out}' holds a finished run with no checkpoint to continue from; "
            "choose a new output_dir, or pass --overwrite to move the old run aside"
        )


def move_aside(out: Path) -> Path:
    """Rename a previous run to `<out>.replaced-<time>` (nothing is deleted)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = out.with_name(f"{out.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = out.with_name(f"{out.name}.replaced-{stamp}-{n}")
    out.rename(target)
    return target


def _holder() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def process_alive(pid: int) -> bool:
    """Whether `pid` is a live process that could be a bigft run (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True  # no /proc: trust the pid
    return b"python" in cmdline or b"bigft" in cmdline


def _stale(record: dict[str, Any]) -> bool:
    me = _holder()
    if record.get("host") == me["host"] and record.get("pid") == me["pid"]:
        return True  # this very process (a run set up again in the same interpreter)
    if record.get("slurm_job_id") and record.get("slurm_job_id") == me["slurm_job_id"]:
        return True  # this job was requeued: its earlier incarnation is gone
    return record.get("host") == me["host"] and not process_alive(int(record.get("pid", -1)))


def acquire(out: Path) -> str | None:
    """Take the lock of `out` for this process; returns a note when a stale lock was
    taken over. Raises when a live run holds it."""
    path = out / LOCK
    note = None
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # less the umask
        except FileExistsError:
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                record = {}  # half-written by a process killed while it took the lock
            if record and not _stale(record):
                raise BigftError(
                    f"output_dir '{out}' is in use by another bigft run (host "
                    f"{record.get('host')}, pid {record.get('pid')}, since "
                    f"{record.get('since')}); wait for it to end or stop it, or, if it is "
                    f"gone, delete {path}"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            mine = record.get("pid") == os.getpid() and record.get("host") == _holder()["host"]
            note = (
                None
                if mine
                else (
                    f"took over the lock of a run that is gone (host {record.get('host')}, "
                    f"pid {record.get('pid')})"
                    if record
                    else "replaced an unreadable lock file"
                )
            )
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(_holder(), f)
        return note
    raise BigftError(f"output_dir '{out}': could not take {path}; another run took it first")


def release(out: Path) -> None:
    """Drop the lock if this process holds it."""
    path = out / LOCK
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if record.get("pid") == os.getpid() and record.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
