"""What a run says before its first step: the start-up table and the memory plan."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

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
    if run.teacher is not None:
        method += f" + distillation from {cfg.distill.teacher}"
    stats = run.data.stats
    data_lines = [
        f"{name} {s.source}"
        if name == "train" and cfg.data.streaming
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
            f"{acc.num_processes} = global {layout.global_batch_size} rows of seq_len "
            f"{cfg.train.seq_len}",
        ),
        ("steps", f"{run.total_steps:,}" + (f" (resuming at {step})" if step else "")),
        ("output", str(run.output_dir)),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def _memory_plan_text(run: Run) -> str:
    """The planner's predicted peak per GPU for this run, or why there is none."""
    if run.cfg.task != "causal_lm":
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


def progress_bar(run: Run) -> Progress:
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeRemainingColumn(),
        console=run.console,
        disable=not (run.accelerator.is_main_process and run.cfg.logging.progress_bar),
        transient=False,
    )
