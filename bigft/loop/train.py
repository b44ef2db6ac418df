"""The training loop: optimizer steps until the run is done or asked to stop, evaluation and
checkpoints on their schedule, and the run's end (final checkpoint, export, summary.json).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from rich.console import Console

from bigft import faults, rundir
from bigft.config import Config
from bigft.engine import checkpoint as ckpt
from bigft.engine import preemption
from bigft.engine.accelerator import print_on_main, release
from bigft.engine.facts import engine_report, peak_memory_mib
from bigft.errors import TrainingError
from bigft.eval.during_training import (
    best_text,
    evaluate_run,
    load_best,
    tracks_best,
    update_best,
)
from bigft.loop.run import Run
from bigft.loop.setup import setup
from bigft.loop.step import train_step
from bigft.loop.summary import StepLog, startup_summary
from bigft.losses import Batch
from bigft.optim import describe_groups
from bigft.tracking import (
    strict_json,
)


def _next_micro_batches(run: Run, batches: Iterator[Batch]) -> list[Batch]:
    """The step's micro-batches as the loader made them, on the host (`train_step`
    counts their tokens there and moves them to the device)."""
    return [next(batches) for _ in range(run.layout.grad_accum)]


def train(run: Run, stop_after: int | None = None) -> dict[str, Any]:
    """Run optimizer steps to the end, evaluating and checkpointing on schedule.

    `stop_after` ends the run early at that step with a resumable checkpoint, as a
    preempted job would (the final evaluation and export are skipped). The output
    directory's lock is released however the run ends.
    """
    try:
        return _train(run, stop_after)
    finally:
        if run.accelerator.is_main_process:
            rundir.release(run.output_dir)


def _train(run: Run, stop_after: int | None) -> dict[str, Any]:
    cfg, acc = run.cfg, run.accelerator
    print_on_main(acc, run.console, startup_summary(run))
    if run.data_source:
        print_on_main(acc, run.console, run.data_source, soft_wrap=True, highlight=False)
    print_on_main(acc, run.console, describe_groups(run.optimizer))
    state = run.state
    if cfg.eval.at_start and state.step == 0:
        evaluate_run(run)
    run.model.train()
    batches = iter(run.loader)
    with StepLog(run) as steps:
        window_start, window_tokens = time.perf_counter(), 0.0
        while state.step < run.total_steps:
            upcoming = state.step + 1
            logged = upcoming % cfg.train.log_every == 0 or upcoming == run.total_steps
            stats = train_step(run, _next_micro_batches(run, batches), logged)
            state.step += 1
            state.tokens += stats["tokens"]
            state.targets += stats["targets"]
            _count_skipped(run, stats)
            window_tokens += stats["tokens"]
            record: dict[str, Any] | None = None
            if logged or stats["nonfinite"]:  # a skipped step is always logged
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": state.step,
                    "loss": round(stats["loss"], 6),
                    "lr": stats["lr"],
                    "grad_norm": round(stats["grad_norm"], 6),
                    "tokens_per_s": round(window_tokens / max(elapsed, 1e-9), 1),
                    "epoch": round(run.loader.epoch_progress, 4),
                    "mem_mib": peak_memory_mib(acc),
                    "skipped_steps": state.skipped_steps,
                }
                for name, loss in stats.get("source_losses", {}).items():
                    record[f"loss/{name}"] = round(loss, 6)
                for name, value in stats.get("preference", {}).items():
                    record[name] = round(value, 6)
                run.metrics.write(record)
                window_start, window_tokens = time.perf_counter(), 0.0
            steps.step(state.step, record)
            _stop_if_nonfinite(run, stats)
            if _evaluate_and_checkpoint(run):
                print_on_main(
                    acc, run.console, f"early stopping at step {state.step}: {best_text(run)}"
                )
                break
            reason = _stop_reason(run, stop_after, stats["stop_requests"])
            if reason is not None:
                run.save()
                print_on_main(
                    acc, run.console, f"stopped at step {state.step} ({reason}); checkpoint written"
                )
                return {"steps": state.step, "stopped": reason, "output_dir": str(run.output_dir)}
    return _finish(run)


def _count_skipped(run: Run, stats: dict[str, float]) -> None:
    """Count and report a step whose update was held back for non-finite values."""
    if stats["nonfinite"] and not stats["applied"]:
        run.state.skipped_steps += 1
        print_on_main(
            run.accelerator,
            run.console,
            f"[yellow]step {run.state.step}: {_nonfinite_text(stats)}: update skipped[/] "
            f"({run.state.skipped_steps} so far)",
        )


def _stop_if_nonfinite(run: Run, stats: dict[str, float]) -> None:
    """train.nonfinite stop (or too many skips): checkpoint the state, which the held-back
    update left as it was before this step, and end the run with an error.

    Resuming from that checkpoint continues after the offending batch.
    """
    if not stats["nonfinite"]:
        return
    train, step = run.cfg.train, run.state.step
    what = f"step {step}: {_nonfinite_text(stats)}"
    if stats["applied"]:  # an engine that updated anyway (DeepSpeed, overflow check off)
        raise TrainingError(
            f"{what}, and the engine applied the update: the weights are no longer "
            "trustworthy; resume from an earlier checkpoint (train.resume=<its directory>)"
        )
    skipped = run.state.skipped_steps
    if train.nonfinite == "stop":
        reason = "train.nonfinite is stop"
    elif train.max_skipped is not None and skipped > train.max_skipped:
        reason = f"{skipped} steps skipped, more than train.max_skipped = {train.max_skipped}"
    else:
        return
    path = run.save()
    raise TrainingError(
        f"{what}; stopped ({reason}). The update was not applied: {path} holds the weights "
        f"of step {step - 1} and resumes after this batch (e.g. with a lower optim.lr)"
    )


def _nonfinite_text(stats: dict[str, float]) -> str:
    loss, norm = stats["loss"], stats["grad_norm"]
    return f"non-finite loss or gradient (loss {loss:.4g}, grad norm {norm:.4g})"


def _evaluate_and_checkpoint(run: Run) -> bool:
    """Scheduled evaluation and checkpoints; True when early stopping ends the run.

    A new best eval.metric gets a checkpoint of its own when the run keeps the best
    (keep_best, early stopping, load_best_at_end), and checkpoints/best.json names it.
    """
    cfg = run.cfg
    improved = stop = False
    if cfg.eval.every_steps and run.state.step % cfg.eval.every_steps == 0:
        improved, stop = update_best(run, evaluate_run(run))
    new_best = improved and tracks_best(cfg)
    every = cfg.checkpoint.every_steps
    periodic = every is not None and run.state.step % every == 0
    if periodic or new_best:
        path = run.save()
        if new_best and run.accelerator.is_main_process:
            ckpt.mark_best(run.output_dir, path, run.state.best)
        run.accelerator.wait_for_everyone()
    return stop


def _stop_reason(run: Run, stop_after: int | None, stop_requests: float) -> str | None:
    """A signal on any process (counted in the step's reduce) stops every process at the
    same step."""
    if stop_after is not None and run.state.step >= stop_after:
        return "stop_after"
    if stop_requests == 0:
        return None
    return preemption.requested() or "signal on another process"


def _finish(run: Run) -> dict[str, Any]:
    """The end of a run: the final checkpoint, evaluations, export and summary.json.

    The checkpoint comes first: a run killed later in this phase resumes from it and
    does the rest again, and the metrics it logged here are cut from metrics.jsonl
    (they were logged after the checkpoint), so they appear once."""
    cfg = run.cfg
    loaded_best = load_best(run)
    state = run.state
    if cfg.checkpoint.every_steps and not loaded_best and state.saved_step != state.step:
        run.save()
    faults.crash_at("end-saved")
    summary: dict[str, Any] = {
        "steps": state.step,
        "early_stopped": state.step < run.total_steps,
        "skipped_steps": state.skipped_steps,
        "world_size": run.accelerator.num_processes,
        "device": run.accelerator.device.type,  # what mem_mib measures: cuda or cpu
        "global_batch_size": run.layout.global_batch_size,
        "engine": engine_report(run.accelerator, run.model, run.optimizer),
        "loss": run.loss_info,
        "output_dir": str(run.output_dir),
        **faults.instrumentation(run.accelerator, run.model),
    }
    if run.mixture:
        summary["mixture"] = [asdict(share) for share in run.mixture]
    if run.reference:
        summary["reference"] = run.reference
    if run.teacher is not None:  # a sharded teacher holds 1/N of its weights per process
        teacher = engine_report(run.accelerator, run.teacher)["param_fraction_local"]
        summary["engine"]["teacher_param_fraction_local"] = teacher
    every = cfg.eval.every_steps
    evaluated_now = every is not None and state.step % every == 0 and not loaded_best
    if state.best:
        summary["best"] = {**state.best, "checkpoint": str(ckpt.best_checkpoint(run.output_dir))}
    if run.data.validation is not None:
        summary["validation"] = (
            state.last_eval if evaluated_now and state.last_eval else evaluate_run(run)
        )
    if run.data.test is not None:
        summary["test"] = evaluate_run(run, "test")
    faults.crash_at("end-evaluated")
    if state.resumed:
        summary["resume"] = state.resumed
    if cfg.checkpoint.export:
        final = ckpt.export_model(
            run.accelerator, run.model, run.tokenizer, run.output_dir / "final"
        )
        summary["final_model"] = str(final)
    faults.crash_at("end-exported")
    if run.accelerator.is_main_process:
        text = strict_json(summary, indent=2, default=str)  # NaN/inf become null
        (run.output_dir / "summary.json").write_text(text)
    return summary


def run_training(
    cfg: Config, console: Console | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """`bigft train`: set up, train, evaluate, export."""
    preemption.install()
    preemption.die_with_launcher()
    run = setup(cfg, console, overwrite)
    accelerator = run.accelerator
    try:
        return train(run)
    finally:
        del run
        release(accelerator)
