"""The training loop: one loop for every method and every engine.

`setup()` builds and validates everything (config → tokenizer → data → model → optimizer)
before anything is written; `train()` runs optimizer steps, each made of `grad_accum`
micro-batches whose loss is normalized by the target tokens of the whole step.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from bigft import checkpoint as ckpt
from bigft import preemption
from bigft.config import Config, dump_config
from bigft.data import (
    Collator,
    PreparedData,
    ShardedLoader,
    pack,
    prepare_data,
    prompt_and_reference,
)
from bigft.distributed import (
    BatchLayout,
    adopt_launcher_strategy,
    batch_layout,
    build_accelerator,
    check_fsdp_layers,
    engine_report,
    full_weights_digest,
    peak_rss_mib_per_rank,
    world_size_from_env,
)
from bigft.errors import BigftError
from bigft.evaluate import evaluate_loss, exact_match, token_loss_sum
from bigft.methods import apply_method
from bigft.model import count_parameters, load_model, load_tokenizer
from bigft.optim import build_optimizer, build_scheduler, describe_groups
from bigft.tracking import MetricsLog

Batch = dict[str, torch.Tensor]


@dataclass
class Run:
    """Everything the loop touches, built by `setup()`."""

    cfg: Config
    accelerator: Accelerator
    model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    loader: ShardedLoader
    data: PreparedData
    layout: BatchLayout
    total_steps: int
    output_dir: Path
    metrics: MetricsLog
    console: Console
    step: int = 0
    last_eval: dict[str, Any] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=lambda: {"tokens": 0, "targets": 0})


def setup(cfg: Config, console: Console | None = None) -> Run:
    """Validate and build everything; only then create the run directory."""
    console = console or Console(stderr=True)
    adopt_launcher_strategy(cfg.parallel)
    layout = batch_layout(cfg.train, world_size_from_env(), _auto_micro_batch(cfg, console))
    accelerator = build_accelerator(cfg.train, cfg.parallel, layout)
    if accelerator.num_processes != layout.world_size:
        layout = batch_layout(cfg.train, accelerator.num_processes)
    accelerator.gradient_accumulation_steps = layout.grad_accum
    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    with accelerator.main_process_first():
        data = prepare_data(cfg.data, tokenizer, cfg.train.seq_len, cfg.train.seed)

    train_rows = (
        pack(data.train, cfg.train.seq_len, cfg.train.seed, tokenizer.pad_token_id)
        if cfg.data.packing
        else data.train
    )
    loader = ShardedLoader(
        train_rows,
        batch_size=layout.micro_batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=cfg.train.seed,
        shuffle=cfg.data.shuffle,
        collate=Collator(tokenizer.pad_token_id, packed=cfg.data.packing),
    )
    total_steps = cfg.train.steps or max(
        1, math.floor(cfg.train.epochs * loader.batches_per_epoch / layout.grad_accum)
    )

    quant = cfg.method.quant if cfg.method.name == "qlora" else None
    model = apply_method(load_model(cfg.model, cfg.train.precision, quant), cfg)
    check_fsdp_layers(model, cfg.parallel)
    output_dir = _prepare_output_dir(cfg, accelerator)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is stepped by hand once per optimizer step (Accelerate would step it
    # once per process), and saved with the checkpoint.
    accelerator.register_for_checkpointing(scheduler)

    run = Run(
        cfg,
        accelerator,
        model,
        tokenizer,
        optimizer,
        scheduler,
        loader,
        data,
        layout,
        total_steps,
        output_dir,
        MetricsLog(output_dir, accelerator.is_main_process),
        console,
    )
    _maybe_resume(run)
    return run


def _auto_micro_batch(cfg: Config, console: Console) -> int | None:
    """`train.micro_batch_size: auto`: the memory planner picks it for this GPU."""
    if cfg.train.micro_batch_size != "auto":
        return None
    from bigft.plan import choose_micro_batch

    micro, report = choose_micro_batch(cfg, world_size_from_env())
    reason = getattr(report, "message", None) or "largest micro-batch that fits"
    if os.environ.get("RANK", "0") == "0":
        console.print(f"planner: micro_batch_size {micro} ({reason})", highlight=False)
    return micro


def _prepare_output_dir(cfg: Config, accelerator: Accelerator) -> Path:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise BigftError(f"output_dir '{out}' exists and is not a directory")
    if accelerator.is_main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(dump_config(cfg))
        except OSError as exc:
            raise BigftError(f"output_dir '{out}': cannot write ({exc.strerror})") from None
    accelerator.wait_for_everyone()
    return out


def _maybe_resume(run: Run) -> None:
    path = ckpt.resolve_resume(run.cfg.train.resume, run.output_dir)
    if path is None:
        return
    ckpt.check_compatible(path, run.cfg.parallel.strategy, run.accelerator.num_processes)
    state = ckpt.load_checkpoint(run.accelerator, path)
    run.step = int(state["step"])
    run.counters.update(state.get("counters", {}))
    run.loader.load_state_dict(state["loader"])
    _print(run, f"resumed from {path} at step {run.step}")


def _print(run: Run, message: str) -> None:
    if run.accelerator.is_main_process:
        run.console.print(message)


def _trainer_state(run: Run) -> dict[str, Any]:
    return {
        "step": run.step,
        "loader": run.loader.state_dict(),
        "counters": run.counters,
        "strategy": run.cfg.parallel.strategy,
        "world_size": run.accelerator.num_processes,
    }


def train_step(run: Run, micro_batches: list[Batch]) -> dict[str, float]:
    """One optimizer step over `grad_accum` micro-batches.

    Each micro-batch's summed token loss is divided by the target tokens of the whole
    step on all processes, so 4 micro-batches of 1 give the same update as 1 of 4
    whatever the sequence lengths. Accelerate divides by grad_accum and DDP averages over
    processes; the scale below undoes both.
    """
    acc, model = run.accelerator, run.model
    local_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
    # One collective per step carries the token counts and any process's stop request.
    counts = torch.tensor(
        [
            local_targets,
            sum(_real_tokens(b) for b in micro_batches),
            preemption.requested() is not None,
        ],
        dtype=torch.float64,
        device=acc.device,
    )
    global_targets, global_tokens, stop_requests = acc.reduce(counts, reduction="sum").tolist()
    scale = run.layout.grad_accum * acc.num_processes / max(global_targets, 1.0)

    loss_total = torch.zeros((), dtype=torch.float64, device=acc.device)
    grad_norm = None
    for batch in micro_batches:
        with acc.accumulate(model):
            loss_sum, _ = token_loss_sum(model, batch)
            acc.backward(loss_sum * scale)
            loss_total += loss_sum.detach().double()
            if acc.sync_gradients and run.cfg.train.max_grad_norm is not None:
                grad_norm = acc.clip_grad_norm_(model.parameters(), run.cfg.train.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
    if grad_norm is None and hasattr(model, "get_global_grad_norm"):
        grad_norm = model.get_global_grad_norm()  # DeepSpeed clips (and measures) itself
    run.scheduler.step()
    loss = acc.reduce(loss_total, reduction="sum").item() / max(global_targets, 1.0)
    return {
        "loss": loss,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "tokens": global_tokens,
        "targets": global_targets,
        "stop_requests": stop_requests,
    }


def _real_tokens(batch: Batch) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int((batch["labels"] != -100).sum() + (batch["position_ids"] == 0).sum())


def _next_micro_batches(run: Run, batches: Iterator[Batch]) -> list[Batch]:
    device = run.accelerator.device
    return [
        {k: v.to(device) for k, v in next(batches).items()} for _ in range(run.layout.grad_accum)
    ]


def train(run: Run, stop_after: int | None = None) -> dict[str, Any]:
    """Run optimizer steps to the end, evaluating and checkpointing on schedule.

    `stop_after` ends the run early at that step with a resumable checkpoint, as a
    preempted job would (the final evaluation and export are skipped).
    """
    cfg, acc = run.cfg, run.accelerator
    trainable, total = count_parameters(acc.unwrap_model(run.model))
    _print(
        run,
        f"[bold]bigft[/] {cfg.model.name_or_path} | {trainable:,}/{total:,} trainable | "
        f"{cfg.parallel.strategy} x {acc.num_processes} process(es) | "
        f"micro-batch {run.layout.micro_batch_size} x accum {run.layout.grad_accum} = "
        f"global {run.layout.global_batch_size} | "
        f"{run.total_steps} steps | {run.output_dir}",
    )
    _print(run, describe_groups(run.optimizer))
    if cfg.eval.at_start and run.step == 0:
        _evaluate(run)
    run.model.train()
    batches = iter(run.loader)
    with _progress(run) as progress:
        task = progress.add_task("train", total=run.total_steps, completed=run.step, stats="")
        window_start, window_tokens = time.perf_counter(), 0.0
        while run.step < run.total_steps:
            stats = train_step(run, _next_micro_batches(run, batches))
            run.step += 1
            run.counters["tokens"] += stats["tokens"]
            run.counters["targets"] += stats["targets"]
            window_tokens += stats["tokens"]
            if run.step % cfg.train.log_every == 0 or run.step == run.total_steps:
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": run.step,
                    "loss": round(stats["loss"], 6),
                    "lr": run.scheduler.get_last_lr()[0],
                    "grad_norm": round(stats["grad_norm"], 6),
                    "tokens_per_s": round(window_tokens / max(elapsed, 1e-9), 1),
                    "epoch": round(_epoch(run.loader), 4),
                }
                run.metrics.write(record)
                progress.update(
                    task,
                    stats=f"loss {record['loss']:.4f} lr {record['lr']:.2e} "
                    f"{record['tokens_per_s']:.0f} tok/s",
                )
                window_start, window_tokens = time.perf_counter(), 0.0
            progress.update(task, completed=run.step)
            if cfg.eval.every_steps and run.step % cfg.eval.every_steps == 0:
                _evaluate(run)
            if cfg.checkpoint.every_steps and run.step % cfg.checkpoint.every_steps == 0:
                ckpt.save_checkpoint(
                    acc, run.output_dir, run.step, _trainer_state(run), cfg.checkpoint.keep_last
                )
            reason = _stop_reason(run, stop_after, stats["stop_requests"])
            if reason is not None:
                ckpt.save_checkpoint(
                    acc, run.output_dir, run.step, _trainer_state(run), cfg.checkpoint.keep_last
                )
                _print(run, f"stopped at step {run.step} ({reason}); checkpoint written")
                return {"steps": run.step, "stopped": reason, "output_dir": str(run.output_dir)}
    return _finish(run)


def _stop_reason(run: Run, stop_after: int | None, stop_requests: float) -> str | None:
    """A signal on any process (counted in the step's reduce) stops every process at the
    same step."""
    if stop_after is not None and run.step >= stop_after:
        return "stop_after"
    if stop_requests == 0:
        return None
    return preemption.requested() or "signal on another process"


def _epoch(loader: ShardedLoader) -> float:
    return loader.epoch + loader.batch_index / loader.batches_per_epoch


def _progress(run: Run) -> Progress:
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


def _eval_batches(run: Run, split: str) -> Iterator[Batch]:
    rows = getattr(run.data, split)
    if rows is None or len(rows) == 0:
        return iter(())
    if run.cfg.data.packing:
        rows = pack(rows, run.cfg.train.seq_len, run.cfg.train.seed, run.tokenizer.pad_token_id)
    loader = ShardedLoader(
        rows,
        batch_size=run.cfg.eval.batch_size or run.layout.micro_batch_size,
        rank=run.accelerator.process_index,
        world_size=run.accelerator.num_processes,
        seed=run.cfg.train.seed,
        shuffle=False,
        collate=Collator(run.tokenizer.pad_token_id, packed=run.cfg.data.packing),
        drop_last=False,
    )
    # Sharded engines (ZeRO-3, FSDP2) gather weights inside forward: every process must
    # run the same number of forwards, so a process short of rows repeats its last batch
    # with every label masked (it adds nothing to the loss).
    count = loader.batches_per_epoch
    if run.cfg.eval.max_batches is not None:
        count = min(count, run.cfg.eval.max_batches)
    return _fill_batches(loader.iter_epoch(), count, lambda: loader.collate([rows[0]]))


def _fill_batches(
    batches: Iterator[Batch], count: int, first_row: Callable[[], Batch]
) -> Iterator[Batch]:
    last: Batch | None = None
    for _ in range(count):
        batch = next(batches, None)
        if batch is None:
            filler = last if last is not None else first_row()
            batch = {**filler, "labels": torch.full_like(filler["labels"], -100)}
        last = batch
        yield batch


def generation_examples(rows: Any, tokenizer: Any, limit: int) -> list[tuple[list[int], str]]:
    """(prompt ids, reference answer) for the first `limit` held-out rows."""
    n = min(limit, len(rows))
    return [
        prompt_and_reference(rows[i]["input_ids"], rows[i]["labels"], tokenizer) for i in range(n)
    ]


def _evaluate(run: Run, split: str = "validation") -> dict[str, Any]:
    """Eval loss/perplexity (all processes) and, if enabled, exact match (every process
    generates the same examples, so sharded engines stay in step)."""
    result: dict[str, Any] = {}
    if getattr(run.data, split) is not None:
        result.update(evaluate_loss(run.model, _eval_batches(run, split), run.accelerator))
    gen = run.cfg.eval.generate
    rows = getattr(run.data, split)
    if gen.enabled and rows is not None and len(rows) and run.cfg.data.format != "text":
        examples = generation_examples(rows, run.tokenizer, gen.num_examples)
        scored = exact_match(
            run.accelerator.unwrap_model(run.model),
            run.tokenizer,
            examples,
            gen.max_new_tokens,
            gen.batch_size,
            run.accelerator.device,
        )
        result["exact_match"] = scored["exact_match"]
        result["samples"] = scored["samples"][:8]
    if split == "validation":
        run.last_eval = result
    if result:
        run.metrics.write({"step": run.step, "split": split, **_scalars(result)})
        shown = " ".join(
            f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}"
            for k, v in _scalars(result).items()
        )
        _print(run, f"step {run.step} {split}: {shown}")
    return result


def _scalars(result: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in result.items() if isinstance(v, int | float)}


def _finish(run: Run) -> dict[str, Any]:
    cfg = run.cfg
    summary: dict[str, Any] = {
        "steps": run.step,
        "world_size": run.accelerator.num_processes,
        "global_batch_size": run.layout.global_batch_size,
        "engine": engine_report(run.accelerator, run.model),
        "weights_sha256_per_rank": full_weights_digest(run.accelerator, run.model),
        "peak_rss_mib_per_rank": peak_rss_mib_per_rank(run.accelerator),
        "output_dir": str(run.output_dir),
    }
    every = cfg.eval.every_steps
    evaluated_now = every is not None and run.step % every == 0
    if run.data.validation is not None:
        summary["validation"] = run.last_eval if evaluated_now and run.last_eval else _evaluate(run)
    if run.data.test is not None:
        summary["test"] = _evaluate(run, "test")
    if cfg.checkpoint.every_steps:
        ckpt.save_checkpoint(
            run.accelerator,
            run.output_dir,
            run.step,
            _trainer_state(run),
            cfg.checkpoint.keep_last,
        )
    if cfg.checkpoint.export:
        final = ckpt.export_model(
            run.accelerator, run.model, run.tokenizer, run.output_dir / "final"
        )
        summary["final_model"] = str(final)
    if run.accelerator.is_main_process:
        (run.output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def run_training(cfg: Config, console: Console | None = None) -> dict[str, Any]:
    """`bigft train`: set up, train, evaluate, export."""
    preemption.install()
    run = setup(cfg, console)
    try:
        return train(run)
    finally:
        run.accelerator.end_training()
