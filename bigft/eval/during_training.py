"""Evaluation inside a training run: the scheduled evaluations, the best checkpoint and
early stopping.

`evaluate_run` scores a split at the run's step (`bigft.eval.split.evaluate_split`);
`update_best` tracks eval.metric for checkpoint.keep_best, eval.early_stopping and
checkpoint.load_best_at_end, and `load_best` brings the best weights back at the end.
"""

from __future__ import annotations

import math
from typing import Any

from bigft.config import Config
from bigft.engine.accelerator import print_on_main
from bigft.engine.checkpoint import best_checkpoint
from bigft.engine.resume import load_checkpoint
from bigft.errors import BigftError
from bigft.eval.split import evaluate_split, scalars
from bigft.loop.run import Run


def evaluate_run(run: Run, split: str = "validation") -> dict[str, Any]:
    """`evaluate_split` at the run's step; a validation result becomes its last_eval."""
    result = evaluate_split(run, split, run.state.step)
    if split == "validation":
        run.state.last_eval = result
    return result


def tracks_best(cfg: Config) -> bool:
    """Whether the run keeps a best checkpoint."""
    return (
        cfg.checkpoint.keep_best
        or cfg.checkpoint.load_best_at_end
        or cfg.eval.early_stopping.patience is not None
    )


def update_best(run: Run, result: dict[str, Any]) -> tuple[bool, bool]:
    """(improved, patience exhausted) after an evaluation."""
    e = run.cfg.eval
    value = result.get(e.metric)
    if not isinstance(value, int | float) or not math.isfinite(value):
        if tracks_best(run.cfg):
            raise BigftError(
                f"eval.metric '{e.metric}' is not among this run's evaluation results "
                f"({', '.join(scalars(result)) or 'none'})"
            )
        return False, False
    state = run.state
    best = state.best
    if not best:
        improved = True
    else:
        change = value - best["value"] if e.higher_is_better else best["value"] - value
        improved = change > e.early_stopping.min_delta
    if improved:
        state.best = {"metric": e.metric, "value": value, "step": state.step, "bad_evals": 0}
    else:
        best["bad_evals"] += 1
    patience = e.early_stopping.patience
    return improved, patience is not None and state.best["bad_evals"] >= patience


def best_text(run: Run) -> str:
    b = run.state.best
    return f"best {b['metric']} {b['value']:.4f} at step {b['step']}" if b else "no best yet"


def load_best(run: Run) -> bool:
    """checkpoint.load_best_at_end: bring back the best checkpoint's weights (True if the
    weights changed)."""
    best = run.state.best
    if not (run.cfg.checkpoint.load_best_at_end and best):
        return False
    if best["step"] == run.state.step:
        return False
    path = best_checkpoint(run.output_dir)
    if path is None:
        raise BigftError(f"{run.output_dir}: checkpoints/best.json names no complete checkpoint")
    load_checkpoint(run.accelerator, path)
    message = f"loaded the best checkpoint {path} ({best_text(run)})"
    print_on_main(run.accelerator, run.console, message)
    return True
