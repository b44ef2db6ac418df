"""Stop requests from the outside world (Slurm's pre-timeout signal, SIGTERM).

A handler only sets a flag; the loop polls it between optimizer steps, agrees across
processes, writes a checkpoint and returns. Nothing heavy ever runs inside a handler.
"""

from __future__ import annotations

import contextlib
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
