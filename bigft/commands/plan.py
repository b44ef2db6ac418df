"""`bigft plan`: per-GPU memory, micro-batch and layouts, before any GPU time is spent.

A typer command function; bigft/commands/root.py registers it. Nothing heavy is imported
at module level (bigft --help stays free of torch); --simulate imports torch when it runs.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from bigft.commands.common import user_errors
from bigft.errors import BigftError

DEFAULT_GPU = "h100-80"  # planned for when neither --gpu / --gpu-mem nor hardware.gpu names one


@user_errors
def plan(
    config: Path | None = typer.Argument(
        None, help="YAML config file (optional with --model).", show_default=False
    ),
    overrides: list[str] | None = typer.Argument(
        None, help="Dotted overrides, e.g. train.seq_len=4096.", show_default=False
    ),
    model: str | None = typer.Option(
        None, "--model", help="Shipped architecture (e.g. llama-3.1-8b) or a model directory."
    ),
    method: str | None = typer.Option(None, help="full | freeze | lora | dora | qlora."),
    strategy: str | None = typer.Option(
        None, help="ddp | zero1 | zero2 | zero3 | zero3-offload | fsdp2."
    ),
    gpu: str | None = typer.Option(
        None, help="GPU model, e.g. rtx4090, a100-80, h100 (default: the config's hardware.gpu)."
    ),
    gpu_mem: float | None = typer.Option(None, "--gpu-mem", help="GPU memory in GiB."),
    gpus_per_node: int | None = typer.Option(
        None, "--gpus-per-node", help="GPUs per node (default: hardware, slurm, else 1)."
    ),
    nodes: int | None = typer.Option(None, help="Nodes (default: hardware, slurm, else 1)."),
    seq_len: int | None = typer.Option(None, "--seq-len", help="Tokens per row."),
    micro_batch: int | None = typer.Option(
        None, "--micro-batch", help="Evaluate this micro-batch instead of choosing one."
    ),
    global_batch: int | None = typer.Option(
        None, "--global-batch", help="Rows per optimizer step over all GPUs."
    ),
    grad_ckpt: bool | None = typer.Option(
        None, "--grad-ckpt/--no-grad-ckpt", help="Gradient checkpointing."
    ),
    lora_rank: int | None = typer.Option(None, "--lora-rank", help="LoRA rank."),
    optimizer: str | None = typer.Option(
        None, help="adamw | adamw_8bit | paged_adamw_8bit | adafactor | sgd."
    ),
    attn: str | None = typer.Option(
        None, "--attn", help="sdpa | flash_attention_2 | eager (default: the config's, sdpa)."
    ),
    margin: float = typer.Option(0.05, help="Fraction of GPU memory kept free."),
    cpu_mem: float = typer.Option(512.0, "--cpu-mem", help="CPU memory per node (GiB)."),
    simulate: bool = typer.Option(
        False, "--simulate", help="Also run one step under FakeTensorMode and measure it."
    ),
    full_depth: bool = typer.Option(
        False, "--full-depth", help="With --simulate: every layer, no extrapolation."
    ),
    max_seq_len: bool = typer.Option(
        False,
        "--max-seq-len",
        help="Find the longest sequence that fits at this micro-batch (with --simulate: "
        "confirmed by simulated steps) and plan it.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Per-GPU memory by component, the micro-batch that fits, and the layouts ranked."""
    from rich.console import Console

    from bigft.plan.from_config import planned_gpu, workload_from_config
    from bigft.plan.hardware import custom_gpu, get_gpu
    from bigft.plan.planner import make_plan
    from bigft.plan.render import plan_json, print_plan, print_seq_len, seq_len_json

    _check_numbers(
        {
            "--gpus-per-node": gpus_per_node,
            "--nodes": nodes,
            "--seq-len": seq_len,
            "--micro-batch": micro_batch,
            "--global-batch": global_batch,
            "--lora-rank": lora_rank,
        },
        {"--gpu-mem": gpu_mem, "--cpu-mem": cpu_mem},
        margin,
    )
    cfg = None
    extra = list(overrides or [])
    if config is not None and "=" in str(config) and not config.exists():
        extra.insert(0, str(config))  # `bigft plan --model X train.seq_len=4096`
        config = None
    if config is not None:
        from bigft.config_io import load_config

        cfg = load_config(config, extra)
        if cfg.task in ("image_classification", "contrastive"):
            raise BigftError(
                f"task {cfg.task}: bigft plan models transformer language models; measure an "
                "image model's memory with a short run (summary.json records its peak)"
            )
    elif extra:
        raise BigftError("key=value overrides need a CONFIG; use the flags with --model")
    if gpu is not None and gpu_mem is not None:
        raise BigftError("pass --gpu or --gpu-mem, not both")
    if max_seq_len and seq_len is not None:
        raise BigftError("pass --seq-len or --max-seq-len (which finds it), not both")
    named = planned_gpu(cfg) if gpu is None and gpu_mem is None else None  # hardware.gpu
    card = custom_gpu(gpu_mem) if gpu_mem is not None else named or get_gpu(gpu or DEFAULT_GPU)
    if gpu_mem is not None:
        source = "--gpu-mem"
    elif gpu is not None:
        source = "--gpu"
    elif named is not None:
        source = "from hardware.gpu in the config"
    else:
        source = f"default: {DEFAULT_GPU}; set hardware.gpu or pass --gpu"
    work = workload_from_config(
        cfg,
        model=model,
        method=method,
        strategy=strategy,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        seq_len=seq_len,
        micro_batch=micro_batch,
        grad_ckpt=grad_ckpt,
        lora_rank=lora_rank,
        optimizer=optimizer,
        attn=attn,
    )
    train = getattr(cfg, "train", None)
    given = micro_batch is not None or isinstance(getattr(train, "micro_batch_size", None), int)
    longest = None
    if max_seq_len:
        from bigft.plan.search import SEQ_STEP
        from bigft.plan.search import max_seq_len as search

        with _quiet():
            longest = search(work, card, margin, cpu_mem, simulate, full_depth)
        if longest.seq_len == 0:
            raise BigftError(
                f"not even {SEQ_STEP} tokens fit at micro-batch {work.micro_batch} on "
                f"{card.name}: plan it with --seq-len {SEQ_STEP} to see where memory goes"
            )
        work, given = work.with_(seq_len=longest.seq_len), True
    report = make_plan(
        work,
        card,
        margin=margin,
        global_batch=_in_sequences(global_batch or getattr(train, "global_batch_size", None), cfg),
        micro_given=given,
        grad_accum=getattr(train, "grad_accum", None),
        cpu_mem_gib=cpu_mem,
    )
    report.gpu_source = source
    labels = work.arch.num_labels
    if cfg is not None and labels is not None:
        listed = (
            ""
            if cfg.task == "regression" or cfg.data.label_names
            else " (unlisted: set data.label_names)"
        )
        report.notes.append(
            f"task {cfg.task}: a sequence head of {labels} output(s){listed} in place of "
            "the LM head; its logits are micro-batch x seq x outputs"
        )
    if cfg is not None and cfg.task == "preference":
        reference = (
            "a frozen reference copy in the compute dtype is counted in parameters"
            if work.reference_copy
            else "no reference copy (log-probabilities precomputed before step 1)"
            if cfg.preference.precompute_reference
            else "no reference copy (adapters disabled, or a reference-free loss)"
        )
        report.notes.append(
            "task preference: micro-batch counts sequences, chosen and rejected of each "
            f"pair (pairs = half); the loss reads full logits; {reference}"
        )
    if longest is not None:
        report.simulated = longest.sim_result
    elif simulate:
        from bigft.plan.simulate import simulate as run_simulation

        with _quiet():
            report.simulated = run_simulation(report.work, full_depth=full_depth)
    if json_out:
        out = plan_json(report)
        if longest is not None:
            out["max_seq_len"] = seq_len_json(longest)
        typer.echo(json.dumps(out, indent=2))
        if not report.fits:
            raise typer.Exit(2)
        return
    if longest is not None:
        print_seq_len(longest, report, Console())
    print_plan(report, Console())
    if report.message:
        raise BigftError(report.message)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the warnings transformers and peft print while the simulator builds models."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _check_numbers(
    counts: dict[str, int | None], gib: dict[str, float | None], margin: float
) -> None:
    """One line naming the flag for a count below 1, a memory size that is not a positive
    finite number (nan and inf parse as floats), or a margin outside [0, 1)."""
    for flag, count in counts.items():
        if count is not None and count < 1:
            raise BigftError(f"{flag} {count}: must be at least 1")
    for flag, size in gib.items():
        if size is not None and not (math.isfinite(size) and size > 0):
            raise BigftError(f"{flag} {size:g}: must be a positive number of GiB")
    if not (math.isfinite(margin) and 0 <= margin < 1):
        raise BigftError(f"--margin {margin:g}: must be a fraction in [0, 1), e.g. 0.05")


def _in_sequences(global_batch: int | None, cfg: Any) -> int | None:
    """A global batch of rows (task preference: pairs) in the sequences the plan counts."""
    from bigft.plan.from_config import sequences_per_row

    return None if global_batch is None else global_batch * sequences_per_row(cfg)
