"""Test hooks: fault injection and instrumentation for the tests.

Each hook does nothing unless its environment variable is set; real runs never set them,
and an unset hook costs no per-step work (the run and the loader ask once, when they are
built). They exist so that a test can produce, in a real multi-process run, the failures
that otherwise only happen at scale (a NaN on one rank, a process killed while it
writes), and observe what the run did (the rows each rank saw, each rank's full weights).

    BIGFT_TEST_NONFINITE_STEPS=3,7   the loss of optimizer steps 3 and 7 becomes NaN
    BIGFT_TEST_NONFINITE_RANK=1      ... on that rank only (default: every rank)
    BIGFT_TEST_CRASH_IN_SAVE=4       the process dies (exit 137, as after SIGKILL) while it
                                     writes checkpoint step 4: after the engine's files,
                                     before trainer_state.json and the rename
    BIGFT_TEST_CRASH_AT=end-evaluated the process dies (exit 137) at that point of the end
                                     of a run: end-saved (final checkpoint written),
                                     end-evaluated (final evaluation records written),
                                     end-exported (final model written, no summary.json)
    BIGFT_TEST_SEEN_ROWS=DIR         each rank appends the rows it is handed to
                                     DIR/rows-rank<r>.jsonl (epoch, positions, row ids)
    BIGFT_TEST_WEIGHTS_DIGEST=1      summary.json gets a sha256 of each rank's full
                                     (gathered) weights and each rank's peak RSS: a gather
                                     of the whole model, which only a test can afford
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

NONFINITE_STEPS = "BIGFT_TEST_NONFINITE_STEPS"
NONFINITE_RANK = "BIGFT_TEST_NONFINITE_RANK"
CRASH_IN_SAVE = "BIGFT_TEST_CRASH_IN_SAVE"
CRASH_AT = "BIGFT_TEST_CRASH_AT"
SEEN_ROWS = "BIGFT_TEST_SEEN_ROWS"
WEIGHTS_DIGEST = "BIGFT_TEST_WEIGHTS_DIGEST"


def nonfinite_steps(rank: int) -> frozenset[int]:
    """The optimizer steps whose loss this process makes NaN (the gradients then become
    NaN too, as they do when a real forward pass overflows); empty unless a test asks.
    Read once, when the run is set up."""
    steps = os.environ.get(NONFINITE_STEPS)
    if not steps:
        return frozenset()
    only = os.environ.get(NONFINITE_RANK)
    if only is not None and int(only) != rank:
        return frozenset()
    return frozenset(int(s) for s in steps.split(",") if s.strip())


def crash_in_save(step: int) -> None:
    """Die without cleanup, mid-checkpoint, when the test asks for it at this step."""
    if os.environ.get(CRASH_IN_SAVE) == str(step):
        os._exit(137)


def crash_at(point: str) -> None:
    """Die without cleanup at a named point of the run, when the test asks for it."""
    if os.environ.get(CRASH_AT) == point:
        os._exit(137)


def row_recorder(rank: int) -> Callable[[int, np.ndarray, np.ndarray], None] | None:
    """A function recording the rows a training loader hands out, or None (no hook)."""
    folder = os.environ.get(SEEN_ROWS)
    if not folder:
        return None
    path = Path(folder) / f"rows-rank{rank}.jsonl"

    def record(epoch: int, positions: np.ndarray, rows: np.ndarray) -> None:
        line = {"epoch": epoch, "positions": positions.tolist(), "rows": rows.tolist()}
        with path.open("a") as f:
            f.write(json.dumps(line) + "\n")

    return record


def instrumentation(accelerator: Any, model: Any) -> dict[str, Any]:
    """What a test asked to see of the finished run (empty unless asked)."""
    if os.environ.get(WEIGHTS_DIGEST) != "1":
        return {}
    from bigft.engine.facts import full_weights_digest, peak_rss_mib_per_rank

    return {
        "weights_sha256_per_rank": full_weights_digest(accelerator, model),
        "peak_rss_mib_per_rank": peak_rss_mib_per_rank(accelerator),
    }
