"""Building a run: `setup()` validates and builds everything (config → tokenizer → data →
model → optimizer → the checkpoint to resume from) before anything is written, into a `Run`
(bigft/loop/run.py).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from rich.console import Console
from rich.markup import escape

from bigft import faults, rundir
from bigft.chunked_loss import prepare_loss
from bigft.config import IMAGE_TASKS, Config
from bigft.config_io import dump_config, redacted_config
from bigft.data import PreparedData, TrainLoader, pack
from bigft.data.images import EpochRows
from bigft.data.labeled import make_collator
from bigft.data.mixture import SourceShare, mix
from bigft.data.prepared import preparation_text, prepared_for_task
from bigft.data.streaming import StreamLoader
from bigft.engine.accelerator import adopt_launcher_strategy, build_accelerator, print_on_main
from bigft.engine.checkpoint import clean_partial
from bigft.engine.resume import ResumePoint, check_compatible, check_fits, find_resume
from bigft.engine.settings import apply_tf32, batch_layout, world_size_from_env
from bigft.engine.sharding import check_fsdp_layers, offloads_optimizer_step
from bigft.engine.storage import check_disk_space
from bigft.errors import BigftError
from bigft.eval.during_training import (
    tracks_best,
)
from bigft.eval.metrics import load_scorer
from bigft.loop.reference import preference_reference
from bigft.loop.run import Run
from bigft.model.attention import attention_implementation
from bigft.model.checks import check_model_config, check_model_dir
from bigft.model.compiled import compile_layers
from bigft.model.load import load_configured_model, load_model, load_preprocessor, pad_token_id
from bigft.model.methods import ADAPTER_METHODS, apply_method
from bigft.optim import build_optimizer, build_scheduler
from bigft.tracking import (
    resolve_trackers,
    start_tracking,
    tensorboard_dir,
)

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
    tokenizer = load_preprocessor(cfg)  # a tokenizer, an image processor or a processor
    data, label_names, preparation = prepared_for_task(cfg, tokenizer)

    if tracks_best(cfg) and data.validation is None:
        raise BigftError(
            "early stopping / keep_best / load_best_at_end evaluate the validation split: "
            "set data.validation or data.split.validation"
        )
    if cfg.eval.scorer is not None:
        load_scorer(cfg.eval.scorer)  # a bad name fails now, not at the first evaluation
    loader, shares = _train_loader(cfg, data, tokenizer, layout, accelerator, label_names)
    total_steps = cfg.train.steps or max(
        1, math.floor(cfg.train.epochs * loader.batches_per_epoch / layout.grad_accum)
    )

    model = load_configured_model(
        cfg,
        label_names,
        pad_token_id(tokenizer),
        cfg.method.name,
        # FSDP2 fills every rank's shards from rank 0 at prepare
        from_rank0=cfg.parallel.strategy == "fsdp2" and cfg.parallel.fsdp_cpu_ram_efficient_loading,
    )
    # Batches are shaped for the attention implementation the model really runs.
    loader.collate = make_collator(
        cfg, tokenizer, attention_implementation(model), label_names, train=True
    )
    model = apply_method(model, cfg)
    # The causal-LM loss in token chunks (train.loss_impl); updated if the model falls back.
    loss_info = (
        prepare_loss(model, cfg.train.loss_impl, cfg.train.loss_chunk)
        if cfg.task == "causal_lm"
        else {}
    )
    if cfg.train.compile:
        compile_layers(model)
    apply_tf32(cfg.train.tf32)
    check_fsdp_layers(model, cfg.parallel)
    rundir.check_output_dir(Path(cfg.output_dir), cfg.train.resume, overwrite)
    check_disk_space(cfg.output_dir, model, cfg.optim.name, cfg.checkpoint.export)
    optimizer = build_optimizer(model, cfg.optim, offloads_optimizer_step(cfg.parallel))
    # The scheduler is stepped by hand once per optimizer step (Accelerate would step it
    # once per process). Its state is saved in trainer_state.json, not registered with
    # Accelerate, which would pickle it and unpickle it with full trust on resume.
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps)
    resume = _find_resume(cfg, accelerator, model, overwrite)

    output_dir = _prepare_output_dir(cfg, accelerator, overwrite)  # the first write
    try:
        model, optimizer = accelerator.prepare(model, optimizer)
        teacher = load_teacher(cfg, label_names, pad_token_id(tokenizer), accelerator)
        reference = ""
        if cfg.task == "preference":
            data, reference = preference_reference(
                cfg, accelerator, model, data, teacher, tokenizer, layout, preparation.path, console
            )
            assert isinstance(loader, TrainLoader)  # task preference does not stream
            loader.dataset = data.train
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
            loss_info=loss_info,
            data_source=preparation_text(preparation),
            reference=reference,
            mixture=shares,
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


def _train_loader(
    cfg: Config,
    data: PreparedData,
    tokenizer: Any,
    layout: Any,
    accelerator: Accelerator,
    label_names: list[str] | None = None,
) -> tuple[TrainLoader | StreamLoader, list[SourceShare]]:
    """This process's training batches (prepared rows, mixed and packed, or a stream),
    and each source's share of an epoch (a mixture of prepared sources)."""
    packed = cfg.data.packing and cfg.task == "causal_lm"
    on_gpu = accelerator.device.type == "cuda"
    options = {
        "batch_size": layout.micro_batch_size,
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        # replaced once the model is loaded
        "collate": make_collator(cfg, tokenizer, None, label_names, train=True),
        "workers": (2 if on_gpu else 0)
        if cfg.data.loader_workers is None
        else cfg.data.loader_workers,
        "pin_memory": on_gpu,
        "prefetch": cfg.data.loader_prefetch,
    }
    seq_len, seed = cfg.train.seq_len, cfg.train.seed
    if cfg.data.streaming:
        return StreamLoader(cfg.data, tokenizer, seq_len, seed, packed=packed, **options), []
    rows, shares = data.train, list[SourceShare]()
    if cfg.task == "causal_lm" and len(cfg.data.train_sources) > 1:
        rows, shares = mix(data.train, cfg.data.train_sources, seed)
    if packed:  # the prepared rows come with their packing plan; a mixture is packed now
        plan = data.train_plan if rows is data.train else None
        rows = pack(rows, seq_len, seed, tokenizer.pad_token_id, plan)
    if cfg.task in IMAGE_TASKS:  # images are augmented per (epoch, row)
        rows = EpochRows(rows)
    return TrainLoader(rows, seed=seed, shuffle=cfg.data.shuffle, **options), shares


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


def load_teacher(
    cfg: Config, label_names: list[str] | None, pad_token_id: int | None, accelerator: Accelerator
) -> Any:
    """distill.teacher, or task preference's reference model (full fine-tuning with a
    loss that has one): frozen, in eval mode, laid out like the student.

    ZeRO-3 loads it partitioned (the engine's zero.Init is live) and wraps it in a
    DeepSpeed inference engine, so each process holds 1/N of it and gathers layer by
    layer in forward; FSDP2 shards it with the student's plugin. Under DDP and ZeRO-1/2
    every process holds a full copy. Called after the student is prepared, so the
    engine's configuration is final.
    """
    name, what = cfg.distill.teacher, "distill.teacher"
    if cfg.task == "preference":
        from bigft.preference_losses import needs_reference

        if (
            not needs_reference(cfg.preference)
            or cfg.method.name in ADAPTER_METHODS
            or cfg.preference.precompute_reference
        ):
            return None  # reference-free, adapters disabled, or scored before step 1
        name, what = cfg.model.name_or_path, "model.name_or_path (the reference)"
    if name is None:
        return None
    teacher_cfg = cfg.model.model_copy(update={"name_or_path": name})
    teacher = load_model(
        teacher_cfg,
        cfg.train.precision,
        None,
        cfg.task,
        label_names,
        pad_token_id,
        # frozen: in the compute dtype under mixed precision, like a frozen base
        method="freeze" if cfg.task == "preference" else "full",
        what=what,
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

    def claim() -> list[str]:
        notes: list[str] = []
        try:
            if overwrite and rundir.holds_run(out):
                notes.append(f"moved the previous run in {out} to {rundir.move_aside(out)}")
            out.mkdir(parents=True, exist_ok=True)
            taken = rundir.acquire(out)
            notes += [taken] if taken else []
            (out / "config.yaml").write_text(dump_config(cfg))
        except OSError as exc:
            raise BigftError(f"output_dir '{out}': cannot write ({exc.strerror})") from None
        return notes

    for note in _decided_on_main(accelerator, claim):
        print_on_main(accelerator, Console(stderr=True), note, highlight=False)
    accelerator.wait_for_everyone()
    return out


def _find_resume(
    cfg: Config, accelerator: Accelerator, model: Any, overwrite: bool
) -> ResumePoint | None:
    """The checkpoint to resume from, checked whole, compatible and (where its tensor
    names can be read cheaply) fitting `model` before anything is written
    (`find_resume`); decided on the main process, so every process resumes from the
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

    def decide() -> ResumePoint | None:
        point = find_resume(resume, out, accelerator.num_processes)
        if point is not None:
            check_compatible(point.location, cfg.parallel.strategy, accelerator.num_processes)
            check_fits(point.location, model)
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


def _resume(run: Run, point: ResumePoint | None) -> None:
    """Clean up after a killed save, load the checkpoint `_find_resume` chose, and cut
    metrics.jsonl back to what it held when that checkpoint was written."""
    for note in clean_partial(run.accelerator, run.output_dir):
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
