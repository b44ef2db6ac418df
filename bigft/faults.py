"""Fault injection for the reliability tests (tests/integration/test_drills.py).

Each hook does nothing unless its environment variable is set; real runs never set them.
They exist so that a test can produce, in a real multi-process run, the failures that
otherwise only happen at scale: a NaN on one rank, a process killed while it writes.

    BIGFT_TEST_NONFINITE_STEPS=3,7   the loss of optimizer steps 3 and 7 becomes NaN
    BIGFT_TEST_NONFINITE_RANK=1      ... on that rank only (default: every rank)
    BIGFT_TEST_CRASH_IN_SAVE=4       the process dies (exit 137, as after SIGKILL) while it
                                     writes checkpoint step 4: after the engine's files,
                                     before trainer_state.json and the rename
"""

from __future__ import annotations

import os

import torch

NONFINITE_STEPS = "BIGFT_TEST_NONFINITE_STEPS"
NONFINITE_RANK = "BIGFT_TEST_NONFINITE_RANK"
CRASH_IN_SAVE = "BIGFT_TEST_CRASH_IN_SAVE"


def nonfinite_loss(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """`loss`, or NaN at the configured steps (the gradients then become NaN too, as they
    do when a real forward pass overflows)."""
    steps = os.environ.get(NONFINITE_STEPS)
    if not steps or step not in {int(s) for s in steps.split(",") if s.strip()}:
        return loss
    only = os.environ.get(NONFINITE_RANK)
    if only is not None and int(only) != rank:
        return loss
    return loss * float("nan")


def crash_in_save(step: int) -> None:
    """Die without cleanup, mid-checkpoint, when the test asks for it at this step."""
    if os.environ.get(CRASH_IN_SAVE) == str(step):
        os._exit(137)
