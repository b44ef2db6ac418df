"""Stop requests from the outside world (Slurm's pre-timeout signal, SIGTERM).

A handler only sets a flag; the loop polls it between optimizer steps, agrees across
processes, writes a checkpoint and returns. Nothing heavy ever runs inside a handler.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from types import FrameType

_requested: str | None = None


def _handler(signum: int, frame: FrameType | None) -> None:
    global _requested
    _requested = signal.Signals(signum).name


def install(names: tuple[str, ...] = ("SIGUSR1", "SIGTERM")) -> None:
    """Route the named signals to the stop flag (main thread only; no-op elsewhere)."""
    for name in names:
        # ValueError: not the main thread; AttributeError: no such signal on this OS.
        with contextlib.suppress(ValueError, AttributeError):
            signal.signal(getattr(signal, name), _handler)


def requested() -> str | None:
    """The name of the signal that asked this process to stop, if any."""
    return _requested


def request(reason: str = "requested") -> None:
    """Ask the loop to stop at the next step boundary (also used by tests)."""
    global _requested
    _requested = reason


def clear() -> None:
    global _requested
    _requested = None


def die_with_launcher() -> None:
    """Under torchrun (or accelerate launch), exit when the launcher dies.

    torchrun starts its workers in a session of their own, so killing the process group
    of `bigft launch` (Ctrl-C in a terminal that died, kill -9 of a job step) leaves
    them training as orphans beside any new run. The parent-death signal makes the
    kernel kill each worker with its launcher. Linux only; a no-op elsewhere.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # set by torchrun and accelerate launch
        return
    launcher = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != launcher:  # the launcher died before the signal was armed
        os._exit(1)
