"""A run as the loop sees it: the objects built once (`Run`, by `train.setup`) and the
state that advances with every step (`LoopState`).

A checkpoint's trainer_state.json is `Run.state_dict()`: the loop's state, the data
position and the schedule, and the layout that wrote it. `Run.save` writes a checkpoint
and `Run.restore` loads one back; nothing else reads or writes that file's contents.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from rich.console import Console

from bigft.config import Config
from bigft.data import PreparedData, TrainLoader
from bigft.data.mixture import SourceShare
from bigft.data.streaming import StreamLoader
from bigft.engine import checkpoint as ckpt
from bigft.engine.resume import load_checkpoint
from bigft.engine.settings import BatchLayout
from bigft.tracking import MetricsLog


@dataclass
class LoopState:
    """What changes as training goes; all of it but `saved_step` travels in checkpoints."""

    step: int = 0  # optimizer steps taken
    saved_step: int | None = None  # step of the checkpoint this process last wrote or loaded
    tokens: float = 0  # input tokens trained on, all processes, padding excluded
    targets: float = 0  # tokens the loss was computed on
    skipped_steps: int = 0  # steps whose update was held back for non-finite values
    best: dict[str, Any] = field(default_factory=dict)  # best eval.metric so far
    last_eval: dict[str, Any] = field(default_factory=dict)  # the latest validation result
    # Where this run resumed from ({"from", "step", "warnings"}). The warnings (why it
    # will not match an uninterrupted run) are carried through checkpoints, so later
    # resumes still say so.
    resumed: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        """The loop's part of trainer_state.json."""
        counters: dict[str, float] = {"tokens": self.tokens, "targets": self.targets}
        if self.skipped_steps:  # recorded once a step has been skipped
            counters["skipped_steps"] = self.skipped_steps
        return {
            "step": self.step,
            "counters": counters,
            "best": self.best,
            "last_eval": self.last_eval,
            "resume_warnings": self.resumed.get("warnings", []),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the loop's part of a trainer_state.json (fields older checkpoints lack
        keep their defaults); where the state came from is the caller's to record in
        `resumed`."""
        self.step = self.saved_step = int(state["step"])
        counters = state.get("counters", {})
        self.tokens = counters.get("tokens", 0)
        self.targets = counters.get("targets", 0)
        self.skipped_steps = int(counters.get("skipped_steps", 0))
        self.best = state.get("best", {})
        # The evaluation of the checkpoint's step (if any) stands for the end of the run,
        # as it would have without the interruption.
        self.last_eval = state.get("last_eval") or {}
        self.resumed = {"warnings": list(state.get("resume_warnings", []))}


@dataclass(kw_only=True)
class EvalContext:
    """What scoring a model on prepared data needs: `bigft eval` builds one; a training
    `Run` is one."""

    cfg: Config
    accelerator: Accelerator
    model: Any
    tokenizer: Any
    data: PreparedData
    layout: BatchLayout  # eval.batch_size defaults to its micro-batch size
    metrics: MetricsLog
    console: Console
    label_names: list[str] | None = None  # classification: class names in id order
    # distillation teacher, or task preference's frozen reference (eval mode)
    teacher: Any = None


@dataclass(kw_only=True)
class Run(EvalContext):
    """Everything the training loop touches: what `train.setup` builds, and `state`."""

    optimizer: Any
    scheduler: Any  # stepped by `train_step`; saved in trainer_state.json (see setup)
    loader: TrainLoader | StreamLoader
    total_steps: int
    output_dir: Path
    loss_info: dict[str, Any] = field(default_factory=dict)  # train.loss_impl in effect
    data_source: str = ""  # where the prepared data came from (bigft.data.prepared)
    reference: str = ""  # task preference: what the reference model is, in words
    mixture: list[SourceShare] = field(default_factory=list)  # data.train's sources
    # Test hook (bigft.faults): the steps whose loss this process makes NaN.
    nonfinite_steps: frozenset[int] = frozenset()
    state: LoopState = field(default_factory=LoopState)

    def state_dict(self) -> dict[str, Any]:
        """trainer_state.json: the loop's state (`LoopState`), the data position, the
        schedule, the layout that wrote it and the length of metrics.jsonl then."""
        loop = self.state.state_dict()
        return {
            "step": loop["step"],
            "loader": self.loader.state_dict(),
            "counters": loop["counters"],
            "best": loop["best"],
            "scheduler": self.scheduler.state_dict(),
            "strategy": self.cfg.parallel.strategy,
            "world_size": self.accelerator.num_processes,
            "metrics_bytes": self.metrics.size(),  # what a resume cuts metrics.jsonl back to
            "last_eval": loop["last_eval"],
            "resume_warnings": loop["resume_warnings"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the loop's state, the schedule and the data position from a
        trainer_state.json, and cut metrics.jsonl back to what it held then (the
        layout fields were checked when the checkpoint was chosen)."""
        self.state.load_state_dict(state)
        _restore_scheduler(self.scheduler, state.get("scheduler"), self.state.step)
        self.loader.load_state_dict(state["loader"])
        if self.accelerator.is_main_process:
            _rewind_metrics(self.metrics, state.get("metrics_bytes"), self.state.step)

    def save(self) -> Path:
        """Checkpoint the run at its current step (every process calls this)."""
        path = ckpt.save_checkpoint(
            self.accelerator,
            self.output_dir,
            self.state.step,
            self.state_dict(),
            self.cfg.checkpoint.keep_last,
        )
        self.state.saved_step = self.state.step
        return path

    def restore(self, path: Path) -> None:
        """Load the checkpoint in `path`: weights, optimizer and RNG states
        (`load_checkpoint`), then its trainer_state.json (`load_state_dict`)."""
        state = load_checkpoint(self.accelerator, path, self.cfg.model.allow_pickle)
        self.load_state_dict(state)


def _restore_scheduler(scheduler: Any, state: dict[str, Any] | None, step: int) -> None:
    """Load the saved schedule; checkpoints older than that field stepped it `step` times
    (bigft's schedules are functions of the step count alone)."""
    if state is not None:
        scheduler.load_state_dict(state)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler stepped before the optimizer"
        for _ in range(step):
            scheduler.step()


def _rewind_metrics(metrics: MetricsLog, size: Any, step: int) -> None:
    """Cut metrics.jsonl back to its length (`size`) when the checkpoint was written: what
    the interrupted run logged after it (steps, evaluations, the end-of-run records) is
    about to be logged again. Checkpoints that predate that record, or a log that is no
    longer the one they saw, drop the records of later steps instead."""
    if isinstance(size, int) and metrics.truncate(size):
        return
    metrics.rewind(step)
