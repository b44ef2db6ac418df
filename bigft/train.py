"""The training loop: one loop for every method and every engine.

`setup()` builds and validates everything (config → tokenizer → data → model → optimizer
→ the checkpoint to resume from) before anything is written, into a `Run` (bigft/run.py);
`train()` runs optimizer steps, each made of `grad_accum` micro-batches whose loss is
normalized by the target tokens of the whole step.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from bigft import checkpoint as ckpt
from bigft import faults, preemption, rundir
from bigft.config import Config
from bigft.config_io import dump_config, redacted_config
from bigft.data import ShardedLoader, pack
from bigft.data.labeled import make_collator, prepare_for_task
from bigft.distributed import (
    adopt_launcher_strategy,
    batch_layout,
    build_accelerator,
    check_fsdp_layers,
    engine_report,
    offloads_optimizer_step,
    peak_memory_mib,
    print_on_main,
    world_size_from_env,
)
from bigft.errors import BigftError, TrainingError
from bigft.eval.during_training import (
    best_text,
    evaluate_run,
    load_best,
    tracks_best,
    update_best,
)
from bigft.eval.metrics import load_scorer
from bigft.losses import count_targets, loss_sum, target_mask
from bigft.methods import apply_method
from bigft.model import (
    attention_implementation,
    attention_summary,
    check_model_config,
    check_model_dir,
    count_parameters,
    load_model,
    load_tokenizer,
)
from bigft.optim import build_optimizer, build_scheduler, describe_groups
from bigft.precision import resolve_precision
from bigft.run import Run
from bigft.tracking import (
    resolve_trackers,
    start_tracking,
    strict_json,
    tensorboard_dir,
)

Batch = dict[str, torch.Tensor]
T = TypeVar("T")


def setup(cfg: Config, console: Console | None = None, overwrite: bool = False) -> Run:
    """Validate and build everything; only then create the run directory.

    Every check a user can fix runs before the first write: the model and teacher
    directories and train.seq_len against them, the data, output_dir (writable, space
    for a checkpoint), optimizer and schedule, and the checkpoint to resume from (whole
    and compatible). `overwrite`: a previous run in output_dir is moved aside instead of
    refused (with train.resume never) or continued."""
    console = console or Console(stderr=True)
    adopt_launcher_strategy(cfg.parallel)
    layout = batch_layout(cfg.train, world_size_from_env(), _auto_micro_batch(cfg, console))
    trackers = resolve_trackers(cfg.logging.trackers)
    accelerator = build_accelerator(
        cfg.train, cfg.parallel, layout, trackers, tensorboard_dir(cfg.output_dir)
    )
    if accelerator.num_processes != layout.world_size:
        layout = batch_layout(cfg.train, accelerator.num_processes)
    accelerator.gradient_accumulation_steps = layout.grad_accum
    set_seed(cfg.train.seed)
    _check_model_sources(cfg)
    tokenizer = load_tokenizer(cfg.model)
    with accelerator.main_process_first():
        data, label_names = prepare_for_task(
            cfg.data, tokenizer, cfg.train.seq_len, cfg.train.seed, cfg.task
        )

    if tracks_best(cfg) and data.validation is None:
        raise BigftError(
            "early stopping / keep_best / load_best_at_end evaluate the validation split: "
            "set data.validation or data.split.validation"
        )
    if cfg.eval.scorer is not None:
        load_scorer(cfg.eval.scorer)  # a bad name fails now, not at the first evaluation
    packed = cfg.data.packing and cfg.task == "causal_lm"
    train_rows = (
        pack(data.train, cfg.train.seq_len, cfg.train.seed, tokenizer.pad_token_id)
        if packed
        else data.train
    )
    loader = ShardedLoader(
        train_rows,
        batch_size=layout.micro_batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=cfg.train.seed,
        shuffle=cfg.data.shuffle,
        collate=make_collator(cfg, tokenizer),  # replaced once the model is loaded
    )
    total_steps = cfg.train.steps or max(
        1, math.floor(cfg.train.epochs * loader.batches_per_epoch / layout.grad_accum)
    )

    quant = cfg.method.quant if cfg.method.name == "qlora" else None
    model = load_model(
        cfg.model,
        cfg.train.precision,
        quant,
        cfg.task,
        label_names,
        tokenizer.pad_token_id,
        # FSDP2 fills every rank's shards from rank 0 at prepare
        from_rank0=cfg.parallel.strategy == "fsdp2" and cfg.parallel.fsdp_cpu_ram_efficient_loading,
        method=cfg.method.name,
    )
    # Batches are shaped for the attention implementation the model really runs.
    loader.collate = make_collator(cfg, tokenizer, attention_implementation(model))
    model = apply_method(model, cfg)
    check_fsdp_layers(model, cfg.parallel)
    rundir.check_output_dir(Path(cfg.output_dir), cfg.train.resume, overwrite)
    ckpt.check_disk_space(cfg.output_dir, model, cfg.optim.name, cfg.checkpoint.export)
    optimizer = build_optimizer(model, cfg.optim, offloads_optimizer_step(cfg.parallel))
    # The scheduler is stepped by hand once per optimizer step (Accelerate would step it
    # once per process). Its state is saved in trainer_state.json, not registered with
    # Accelerate, which would pickle it and unpickle it with full trust on resume.
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps)
    resume = _find_resume(cfg, accelerator, model, overwrite)

    output_dir = _prepare_output_dir(cfg, accelerator, overwrite)  # the first write
    try:
        model, optimizer = accelerator.prepare(model, optimizer)
        teacher = _load_teacher(cfg, label_names, tokenizer.pad_token_id, accelerator)
        run = Run(
            cfg=cfg,
            accelerator=accelerator,
            model=model,
            tokenizer=tokenizer,
            data=data,
            layout=layout,
            metrics=start_tracking(accelerator, output_dir, cfg.logging, redacted_config(cfg)),
            console=console,
            label_names=label_names,
            optimizer=optimizer,
            scheduler=scheduler,
            loader=loader,
            total_steps=total_steps,
            output_dir=output_dir,
            teacher=teacher,
            nonfinite_steps=faults.nonfinite_steps(accelerator.process_index),
        )
        _resume(run, resume)
    except BaseException:
        # What can still fail here (a checkpoint whose tensors do not fit the model)
        # must not leave output_dir looking busy to the next attempt.
        if accelerator.is_main_process:
            rundir.release(output_dir)
        raise
    return run


def _check_model_sources(cfg: Config) -> None:
    """The model's and the teacher's directories and configurations, and train.seq_len
    against both, before the tokenizer (which would be blamed for a broken config.json),
    any data, or any write (the teacher itself loads only after the student is prepared)."""
    check_model_dir(cfg.model.name_or_path, "model.name_or_path", cfg.model.allow_pickle)
    check_model_config(cfg.model, cfg.train.seq_len)
    if cfg.distill.teacher is not None:
        check_model_dir(cfg.distill.teacher, "distill.teacher", cfg.model.allow_pickle)
        teacher = cfg.model.model_copy(update={"name_or_path": cfg.distill.teacher})
        check_model_config(teacher, cfg.train.seq_len, "distill.teacher")


def _load_teacher(
    cfg: Config, label_names: list[str] | None, pad_token_id: int, accelerator: Accelerator
) -> Any:
    """distill.teacher: frozen, in eval mode, laid out like the student.

    ZeRO-3 loads it partitioned (the engine's zero.Init is live) and wraps it in a
    DeepSpeed inference engine, so each process holds 1/N of it and gathers layer by
    layer in forward; FSDP2 shards it with the student's plugin. Under DDP and ZeRO-1/2
    every process holds a full copy. Called after the student is prepared, so the
    engine's configuration is final.
    """
    if cfg.distill.teacher is None:
        return None
    teacher_cfg = cfg.model.model_copy(update={"name_or_path": cfg.distill.teacher})
    teacher = load_model(
        teacher_cfg,
        cfg.train.precision,
        None,
        cfg.task,
        label_names,
        pad_token_id,
        what="distill.teacher",
    )
    teacher.requires_grad_(False)
    teacher.eval()
    if accelerator.distributed_type == DistributedType.DEEPSPEED and any(
        hasattr(p, "ds_numel") for p in teacher.parameters()
    ):
        import deepspeed

        plugin = accelerator.state.deepspeed_plugin
        config = {
            k: v
            for k, v in copy.deepcopy(plugin.deepspeed_config).items()
            if k not in ("optimizer", "scheduler")
        }
        engine, *_ = deepspeed.initialize(model=teacher, config=config)
        engine.eval()  # DeepSpeedEngine.eval() returns None
        return engine
    if accelerator.distributed_type == DistributedType.FSDP:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        sharded = fsdp2_prepare_model(accelerator, teacher)
        sharded.eval()
        return sharded
    return teacher.to(accelerator.device)


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


def _prepare_output_dir(cfg: Config, accelerator: Accelerator, overwrite: bool) -> Path:
    """Claim output_dir for this run: refuse a silent mix with an earlier run, move a
    previous run aside when asked (`--overwrite`), take the directory's lock, write the
    resolved config. Every process reaches the same verdict before any acts."""
    out = Path(cfg.output_dir)
    failure: str | None = None
    notes: list[str] = []
    if accelerator.is_main_process:
        try:
            if overwrite and rundir.holds_run(out):
                notes.append(f"moved the previous run in {out} to {rundir.move_aside(out)}")
            out.mkdir(parents=True, exist_ok=True)
            taken = rundir.acquire(out)
            notes += [taken] if taken else []
            (out / "config.yaml").write_text(dump_config(cfg))
        except BigftError as exc:
            failure = str(exc)
        except OSError as exc:
            failure = f"output_dir '{out}': cannot write ({exc.strerror})"
    if accelerator.num_processes > 1:
        shared: list[Any] = [failure, notes]
        torch.distributed.broadcast_object_list(shared, src=0)
        failure, notes = shared
    if failure is not None:
        raise BigftError(failure)
    for note in notes:
        print_on_main(accelerator, Console(stderr=True), note, highlight=False)
    accelerator.wait_for_everyone()
    return out


def _find_resume(
    cfg: Config, accelerator: Accelerator, model: Any, overwrite: bool
) -> ckpt.ResumePoint | None:
    """The checkpoint to resume from, checked whole, compatible and (where its tensor
    names can be read cheaply) fitting `model` before anything is written
    (`ckpt.find_resume`); decided on the main process, so every process resumes from the
    same one."""
    out, resume = Path(cfg.output_dir), cfg.train.resume
    if overwrite and rundir.holds_run(out):
        if resume == "auto":
            return None  # the previous run is moved aside: this one starts afresh
        if Path(resume).absolute().is_relative_to(out.absolute()):
            raise BigftError(
                f"train.resume: '{resume}' lies inside output_dir '{out}', which --overwrite "
                "moves aside; resume without --overwrite, or copy the checkpoint elsewhere"
            )

    def decide() -> ckpt.ResumePoint | None:
        point = ckpt.find_resume(resume, out, accelerator.num_processes)
        if point is not None:
            ckpt.check_compatible(point.location, cfg.parallel.strategy, accelerator.num_processes)
            ckpt.check_fits(point.location, model)
        return point

    return _decided_on_main(accelerator, decide)


def _decided_on_main(accelerator: Accelerator, decide: Callable[[], T]) -> T:
    """`decide()` on the main process, its answer (or its BigftError) on every process."""
    value: Any = None
    failure: str | None = None
    if accelerator.is_main_process:
        try:
            value = decide()
        except BigftError as exc:
            failure = str(exc)
    if accelerator.num_processes > 1:
        shared: list[Any] = [value, failure]
        torch.distributed.broadcast_object_list(shared, src=0)
        value, failure = shared
    if failure is not None:
        raise BigftError(failure)
    return value  # type: ignore[no-any-return]


def _resume(run: Run, point: ckpt.ResumePoint | None) -> None:
    """Clean up after a killed save, load the checkpoint `_find_resume` chose, and cut
    metrics.jsonl back to what it held when that checkpoint was written."""
    for note in ckpt.clean_partial(run.accelerator, run.output_dir):
        print_on_main(run.accelerator, run.console, note)
    if point is None:
        # A run killed before its first checkpoint starts over: so does its log.
        if run.accelerator.is_main_process:
            run.metrics.rewind(-1)
        return
    for note in point.notes:
        print_on_main(run.accelerator, run.console, f"[yellow]{escape(note)}[/]")
    run.restore(point.path)
    loop = run.state
    warnings = [*loop.resumed["warnings"], *point.warnings]
    loop.resumed = {"from": str(point.path), "step": loop.step, "warnings": warnings}
    for warning in point.warnings:
        print_on_main(run.accelerator, run.console, f"[yellow]warning:[/] {escape(warning)}")
    print_on_main(
        run.accelerator, run.console, f"resumed from {escape(str(point.path))} at step {loop.step}"
    )


def train_step(run: Run, micro_batches: list[Batch]) -> dict[str, float]:
    """One optimizer step over `grad_accum` micro-batches.

    Each micro-batch's summed token loss is divided by the target tokens of the whole
    step on all processes, so 4 micro-batches of 1 give the same update as 1 of 4
    whatever the sequence lengths. Accelerate divides by grad_accum and DDP averages over
    processes; the scale below undoes both.
    """
    acc, model = run.accelerator, run.model
    lr = step_lr(run.optimizer, run.cfg.optim.lr)  # what this step's update uses
    local_targets = sum(count_targets(b) for b in micro_batches)
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
    update: dict[str, float] = {}
    for batch in micro_batches:
        with acc.accumulate(model):
            summed, _ = loss_sum(model, batch, run.teacher, *_distill_args(run))
            if run.state.step + 1 in run.nonfinite_steps:  # a test's fault (bigft.faults)
                summed = summed * float("nan")
            acc.backward(summed * scale)
            loss_total += summed.detach().double()
            if acc.sync_gradients:  # the step's last micro-batch: update, or skip it
                update = _apply_update(run, loss_total, global_targets)
    # A skipped step still advances the schedule: lr stays a function of the step number,
    # the same whether or not a run was interrupted and resumed.
    run.scheduler.step()
    return {
        **update,
        "lr": lr,
        "tokens": global_tokens,
        "targets": global_targets,
        "stop_requests": stop_requests,
    }


def _apply_update(run: Run, loss_total: torch.Tensor, global_targets: float) -> dict[str, float]:
    """Clip, agree on finiteness, then step the optimizer or skip the update.

    The step's loss reduce doubles as the vote: a sum is NaN/inf when any process's
    addend is, so every process reaches the same decision without another collective.
    The clipped gradient norm is global already (DDP's all-reduced gradients, FSDP2's
    reduced norm). fp16 loss scalers overflow on purpose while they calibrate and skip
    those updates themselves, so under fp16 only the loss is checked. DeepSpeed updates
    inside backward and skips steps with non-finite gradients itself (its overflow check;
    seen with ZeRO-2/3 in fp32, with and without clipping); `applied` reports what it did.
    """
    acc, model, train = run.accelerator, run.model, run.cfg.train
    grad_norm = None
    if train.max_grad_norm is not None:
        grad_norm = acc.clip_grad_norm_(model.parameters(), train.max_grad_norm)
    if grad_norm is None and hasattr(model, "get_global_grad_norm"):
        grad_norm = model.get_global_grad_norm()  # DeepSpeed clips (and measures) itself
    check_grads = resolve_precision(train.precision) != "fp16"
    deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
    # Without clipping there is no norm: each process checks its own (shard of the)
    # gradients and the flag rides in the same reduce.
    own_check = check_grads and grad_norm is None and not deepspeed
    bad_grads = float(own_check and _grads_nonfinite(model))
    votes = torch.stack([loss_total, loss_total.new_tensor(bad_grads)])
    loss_sum_all, bad_anywhere = acc.reduce(votes, reduction="sum").tolist()
    loss = loss_sum_all / max(global_targets, 1.0)
    norm = float(grad_norm) if grad_norm is not None else float("nan")
    nonfinite = (
        not math.isfinite(loss)
        or bad_anywhere > 0
        or (check_grads and grad_norm is not None and not math.isfinite(norm))
    )
    # Only bigft's own step can be held back: DeepSpeed stepped in backward, and a
    # GradScaler must see the step to lower its scale (it skips the update itself).
    skip = nonfinite and not deepspeed and acc.scaler is None
    if not skip:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    applied = not skip and not acc.optimizer_step_was_skipped
    return {"loss": loss, "grad_norm": norm, "nonfinite": nonfinite, "applied": applied}


def step_lr(optimizer: Any, base_lr: float) -> float:
    """optim.lr scaled by the schedule as it stands now, i.e. the peak learning rate of
    the coming update (groups with their own lr, e.g. layer-wise decay, scale the same)."""
    group = optimizer.param_groups[0]
    initial = group.get("initial_lr") or group["lr"]
    return base_lr * group["lr"] / initial if initial else 0.0


def _grads_nonfinite(model: Any) -> bool:
    """Whether this process's gradients hold a NaN/inf (one host sync, not one per tensor)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return False
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2 shards
    return not bool(torch.stack([g.isfinite().all() for g in local]).all())


def _distill_args(run: Run) -> tuple[float, float]:
    return run.cfg.distill.temperature, run.cfg.distill.weight


def _real_tokens(batch: Batch) -> int:
    """Input tokens that are not padding (packed rows: positions inside a sequence)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "position_ids" not in batch:
        return int(batch["input_ids"].numel())
    # Packed rows (one row per micro-batch row, or all of them flattened into one): a
    # sequence starts where position_ids is 0; the padding filling a row's tail is a
    # sequence with no target, while every real sequence holds at least one target.
    starts = batch["position_ids"].reshape(-1) == 0
    starts[0] = True
    segment = starts.long().cumsum(0) - 1
    targets = target_mask(batch["labels"]).reshape(-1).long()
    real = torch.bincount(segment, weights=targets.double()) > 0
    return int(real[segment].sum())


def _next_micro_batches(run: Run, batches: Iterator[Batch]) -> list[Batch]:
    device = run.accelerator.device
    return [
        {k: v.to(device) for k, v in next(batches).items()} for _ in range(run.layout.grad_accum)
    ]


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
    print_on_main(acc, run.console, describe_groups(run.optimizer))
    state = run.state
    if cfg.eval.at_start and state.step == 0:
        evaluate_run(run)
    run.model.train()
    batches = iter(run.loader)
    with _progress(run) as progress:
        task = progress.add_task("train", total=run.total_steps, completed=state.step, stats="")
        window_start, window_tokens = time.perf_counter(), 0.0
        while state.step < run.total_steps:
            stats = train_step(run, _next_micro_batches(run, batches))
            state.step += 1
            state.tokens += stats["tokens"]
            state.targets += stats["targets"]
            _count_skipped(run, stats)
            window_tokens += stats["tokens"]
            due = state.step % cfg.train.log_every == 0 or state.step == run.total_steps
            if due or stats["nonfinite"]:  # a skipped step is always logged
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
                run.metrics.write(record)
                progress.update(
                    task,
                    stats=f"loss {record['loss']:.4f} lr {record['lr']:.2e} "
                    f"{record['tokens_per_s']:.0f} tok/s",
                )
                window_start, window_tokens = time.perf_counter(), 0.0
            progress.update(task, completed=state.step)
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
        f"{name} {s.rows_kept:,} rows, {s.tokens:,} tokens (p50 {s.length_p50}, max {s.length_max})"
        for name, s in stats.splits.items()
    ]
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


def _stop_reason(run: Run, stop_after: int | None, stop_requests: float) -> str | None:
    """A signal on any process (counted in the step's reduce) stops every process at the
    same step."""
    if stop_after is not None and run.state.step >= stop_after:
        return "stop_after"
    if stop_requests == 0:
        return None
    return preemption.requested() or "signal on another process"


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
        "global_batch_size": run.layout.global_batch_size,
        "engine": engine_report(run.accelerator, run.model, run.optimizer),
        "output_dir": str(run.output_dir),
        **faults.instrumentation(run.accelerator, run.model),
    }
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
    try:
        return train(run)
    finally:
        run.accelerator.end_training()
