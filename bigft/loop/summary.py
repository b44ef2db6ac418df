"""What a run says on the console: the start-up table and memory plan before its first
step, then its steps (`StepLog`)."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from bigft.config import IMAGE_TASKS
from bigft.errors import BigftError
from bigft.loop.run import Run
from bigft.model.attention import attention_summary
from bigft.model.load import count_parameters


def startup_summary(run: Run) -> Table:
    """What is about to run, on one screen: model, method, layout, memory plan, data,
    batch and steps, output directory."""
    cfg, acc, layout, step = run.cfg, run.accelerator, run.layout, run.state.step
    trainable, total = count_parameters(acc.unwrap_model(run.model))
    method = cfg.method.name + (
        f" r={cfg.method.lora.r}" if cfg.method.name in ("lora", "dora", "qlora") else ""
    )
    if cfg.distill.teacher is not None:
        method += f" + distillation from {cfg.distill.teacher}"
    stats = run.data.stats
    images = cfg.task in IMAGE_TASKS
    data_lines = [
        f"{name} {s.source}"
        if name == "train" and cfg.data.streaming
        else f"{name} {s.rows_kept:,} images ({s.source})"
        if images
        else f"{name} {s.rows_kept:,} rows, {s.tokens:,} tokens (p50 {s.length_p50}, "
        f"max {s.length_max})"
        for name, s in stats.splits.items()
    ]
    for share in run.mixture:
        data_lines.append(
            f"  source {share.name}: {share.rows:,} rows, {share.tokens:,} tokens -> "
            f"{share.epoch_rows:,} rows, {share.epoch_tokens:,} tokens per epoch"
        )
    if stats.packing_efficiency is not None:
        data_lines.append(
            f"packed into {stats.packed_rows:,} rows of {stats.seq_len} "
            f"({stats.packing_efficiency:.1%} filled)"
        )
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("model", f"{cfg.model.name_or_path} ({cfg.task})"),
        ("attention", attention_summary(acc.unwrap_model(run.model))),
        ("parameters", f"{trainable:,} trainable of {total:,} ({trainable / max(total, 1):.2%})"),
        ("method", method),
        *([("reference", run.reference)] if run.reference else []),
        (
            "layout",
            f"{cfg.parallel.strategy} x {acc.num_processes} process(es), "
            f"precision {cfg.train.precision}",
        ),
        ("memory plan", _memory_plan_text(run)),
        ("data", "\n".join(data_lines)),
        (
            "batch",
            f"micro-batch {layout.micro_batch_size} x accum {layout.grad_accum} x "
            f"{acc.num_processes} = global {layout.global_batch_size} "
            + ("images" if images else f"rows of seq_len {cfg.train.seq_len}"),
        ),
        ("steps", f"{run.total_steps:,}" + (f" (resuming at {step})" if step else "")),
        ("output", str(run.output_dir)),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def _memory_plan_text(run: Run) -> str:
    """The planner's predicted peak per GPU for this run, or why there is none."""
    if run.cfg.task in IMAGE_TASKS:
        return "not planned: the planner models transformer language models"
    if run.cfg.task in ("classification", "regression"):
        return "not planned for sequence-classification models"
    try:
        from bigft.plan import plan_for_run

        cfg = run.cfg.model_copy(
            update={
                "train": run.cfg.train.model_copy(
                    update={"micro_batch_size": run.layout.micro_batch_size}
                )
            }
        )
        report = plan_for_run(cfg, run.accelerator.num_processes, run.layout.grad_accum)
    except BigftError as exc:
        return f"unavailable ({exc})"
    where = report.gpu.name if report.gpu.memory_gib else "per GPU"
    return f"predicted peak {report.total / 2**30:.2f} GiB {where}"


class StepLog:
    """How the main process shows training steps.

    In a terminal, a rich progress bar (`logging.progress_bar`). Anywhere else (a Slurm
    log, nohup, CI), and when the bar is turned off, one plain line per logged step:
    a bar written to a file shows nothing until the run ends. Other processes show
    nothing.
    """

    def __init__(self, run: Run) -> None:
        self.console, self.total = run.console, run.total_steps
        main = run.accelerator.is_main_process
        terminal = run.console.is_terminal and run.cfg.logging.progress_bar
        self.bar = _progress_bar(run.console) if main and terminal else None
        self.plain = main and not terminal
        self.first_step, self.started = run.state.step, time.perf_counter()
        self.task: TaskID | None = None
        self.unit = "img" if run.cfg.task in IMAGE_TASKS else "tok"  # tokens_per_s counts

    def __enter__(self) -> StepLog:
        if self.bar is not None:
            self.bar.start()
            self.task = self.bar.add_task(
                "train", total=self.total, completed=self.first_step, stats=""
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def step(self, step: int, record: dict[str, Any] | None = None) -> None:
        """Step `step` is done; `record` is its metrics when it was logged."""
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, completed=step)
            if record is not None:
                self.bar.update(self.task, stats=_bar_stats(record, self.unit))
        elif self.plain and record is not None:
            line = step_line(record, self.total, self._eta(step), self.unit)
            self.console.print(line, soft_wrap=True, highlight=False, markup=False)

    def _eta(self, step: int) -> float | None:
        """Seconds left at the pace of this process's steps so far (evaluations and
        checkpoints included)."""
        done = step - self.first_step
        if done <= 0:
            return None
        return (time.perf_counter() - self.started) / done * (self.total - step)


def step_line(record: dict[str, Any], total: int, eta_s: float | None, unit: str = "tok") -> str:
    """One logged step as a plain line: step/total, loss, lr, tokens/s (images/s: `unit`
    img), peak memory, ETA."""
    eta = "?" if eta_s is None else str(timedelta(seconds=round(eta_s)))
    return (
        f"step {record['step']}/{total}  loss {record['loss']:.4f}  lr {record['lr']:.3e}  "
        f"{record['tokens_per_s']:,.0f} {unit}/s  mem {record['mem_mib']:,.0f} MiB  eta {eta}"
    )


def _bar_stats(record: dict[str, Any], unit: str = "tok") -> str:
    return f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['tokens_per_s']:.0f} {unit}/s"


def _progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
