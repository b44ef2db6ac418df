"""Scoring one split of prepared data on every process at once: the evaluation that a
training run (`bigft.eval.during_training`) and `bigft eval` (`bigft.eval.standalone`)
share.

`evaluate_split` reports loss / perplexity and exact match for causal LM, accuracy / F1 /
AUC or MSE / MAE for labelled tasks, and eval.scorer's metrics; it writes them to
metrics.jsonl and prints them on the main process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from bigft.data import data_loader, pack, prompt_and_reference
from bigft.data import eval_batches as rank_batches
from bigft.data.labeled import make_collator
from bigft.data.mixture import SOURCE, sources_of
from bigft.engine.accelerator import print_on_main
from bigft.errors import BigftError
from bigft.eval.metrics import (
    evaluate_contrastive,
    evaluate_labeled,
    evaluate_loss,
    exact_match,
    load_scorer,
)
from bigft.loop.run import EvalContext
from bigft.model.attention import attention_implementation

Batch = dict[str, torch.Tensor]


def evaluate_split(ctx: EvalContext, split: str, step: int) -> dict[str, Any]:
    """Eval loss/perplexity (all processes) and, if enabled, exact match (every process
    generates the same examples, so sharded engines stay in step), logged at `step`."""
    cfg = ctx.cfg
    result: dict[str, Any] = {}
    if getattr(ctx.data, split) is not None and cfg.task == "preference":
        from bigft.loop.preference import evaluate_preference

        batches = eval_batches(ctx, split)
        result.update(
            evaluate_preference(ctx.model, ctx.teacher, batches, ctx.accelerator, cfg.preference)
        )
    elif getattr(ctx.data, split) is not None and cfg.task == "contrastive":
        batches = eval_batches(ctx, split)
        result.update(evaluate_contrastive(ctx.model, batches, ctx.accelerator))
    elif getattr(ctx.data, split) is not None and cfg.task != "causal_lm":
        batches = eval_batches(ctx, split)
        result.update(evaluate_labeled(ctx.model, batches, ctx.accelerator, ctx.label_names))
    elif getattr(ctx.data, split) is not None:
        result.update(causal_lm_loss(ctx, getattr(ctx.data, split)))
    gen = cfg.eval.generate
    rows = getattr(ctx.data, split)
    if gen.enabled and rows is not None and len(rows) and cfg.data.format != "text":
        examples = generation_examples(rows, ctx.tokenizer, gen.num_examples)
        scored = exact_match(
            ctx.accelerator.unwrap_model(ctx.model),
            ctx.tokenizer,
            examples,
            gen.max_new_tokens,
            gen.batch_size,
            ctx.accelerator.device,
        )
        result["exact_match"] = scored["exact_match"]
        result["samples"] = scored["samples"][:8]
        if cfg.eval.scorer is not None:
            scorer = load_scorer(cfg.eval.scorer)
            predictions = [s["prediction"] for s in scored["samples"]]
            references = [s["reference"] for s in scored["samples"]]
            scores = scorer(predictions, references)
            if not isinstance(scores, dict) or not all(isinstance(k, str) for k in scores):
                raise BigftError(
                    f"eval.scorer '{cfg.eval.scorer}' returned {type(scores).__name__}: "
                    "it must return a dict of metric name -> number"
                )
            result.update(scores)
    if result:
        ctx.metrics.write({"step": step, "split": split, **scalars(result)})
        shown = " ".join(
            f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}" for k, v in scalars(result).items()
        )
        print_on_main(ctx.accelerator, ctx.console, f"step {step} {split}: {shown}")
    return result


def causal_lm_loss(ctx: EvalContext, rows: Any) -> dict[str, Any]:
    """Loss and perplexity of `rows`; for a training mixture whose rows name their source,
    also each source's (`eval_loss/<name>`, `eval_tokens/<name>`), from one pass per
    source (eval.max_batches then caps each source)."""
    sources = ctx.cfg.data.train_sources
    if len(sources) < 2 or SOURCE not in rows.column_names:
        return evaluate_loss(ctx.model, eval_batches(ctx, rows), ctx.accelerator)
    of_row = sources_of(rows)
    result: dict[str, Any] = {}
    loss_sum = tokens = 0.0
    for i, source in enumerate(sources):
        members = np.flatnonzero(of_row == i)
        if not len(members):
            continue
        part = evaluate_loss(ctx.model, eval_batches(ctx, rows.select(members)), ctx.accelerator)
        result[f"eval_loss/{source.label}"] = part["eval_loss"]
        result[f"eval_tokens/{source.label}"] = part["eval_tokens"]
        loss_sum += part["eval_loss"] * part["eval_tokens"]
        tokens += part["eval_tokens"]
    mean = loss_sum / max(tokens, 1.0)
    overall = {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": int(tokens)}
    return {**overall, **result}


def eval_batches(ctx: EvalContext, rows_or_split: Any) -> Iterator[Batch]:
    rows = getattr(ctx.data, rows_or_split) if isinstance(rows_or_split, str) else rows_or_split
    if rows is None or len(rows) == 0:
        return iter(())
    cfg = ctx.cfg
    if cfg.data.packing and cfg.task == "causal_lm":
        rows = pack(rows, cfg.train.seq_len, cfg.train.seed, ctx.tokenizer.pad_token_id)
    collate = make_collator(
        cfg, ctx.tokenizer, attention_implementation(ctx.model), ctx.label_names
    )
    batches, count = rank_batches(
        rows,
        cfg.eval.batch_size or ctx.layout.micro_batch_size,
        ctx.accelerator.process_index,
        ctx.accelerator.num_processes,
    )
    # Sharded engines (ZeRO-3, FSDP2) gather weights inside forward: every process must
    # run the same number of forwards, so a process short of rows repeats its last batch
    # with every label masked (it adds nothing to the loss).
    if cfg.eval.max_batches is not None:
        count = min(count, cfg.eval.max_batches)
        batches = batches[:count]
    loader = data_loader(rows, batches, collate)
    return _fill_batches(iter(loader), count, lambda: collate([rows[0]]))


def _fill_batches(
    batches: Iterator[Batch], count: int, first_row: Callable[[], Batch]
) -> Iterator[Batch]:
    last: Batch | None = None
    for _ in range(count):
        batch = next(batches, None)
        if batch is None:
            filler = last if last is not None else first_row()
            blank = float("nan") if filler["labels"].is_floating_point() else -100
            batch = {**filler, "labels": torch.full_like(filler["labels"], blank)}
        last = batch
        yield batch


def generation_examples(rows: Any, tokenizer: Any, limit: int) -> list[tuple[list[int], str]]:
    """(prompt ids, reference answer) for the first `limit` held-out rows."""
    n = min(limit, len(rows))
    return [
        prompt_and_reference(rows[i]["input_ids"], rows[i]["labels"], tokenizer) for i in range(n)
    ]


def scalars(result: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in result.items() if isinstance(v, int | float)}
