"""Evaluation inside a run: eval batches, metrics per task, the best checkpoint and
early stopping.

`evaluate_split` scores one split (loss / perplexity and exact match for causal LM,
accuracy / F1 / AUC or MSE / MAE for labelled tasks) on every process at once, for a
training run (`evaluate_run`) or `bigft eval`; `update_best` tracks eval.metric for
keep_best, early stopping and load_best_at_end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from bigft import checkpoint as ckpt
from bigft.config import Config
from bigft.data import ShardedLoader, pack, prompt_and_reference
from bigft.data.labeled import make_collator
from bigft.errors import BigftError
from bigft.evaluate import evaluate_labeled, evaluate_loss, exact_match, load_scorer
from bigft.model import attention_implementation
from bigft.run import EvalContext, Run

Batch = dict[str, torch.Tensor]


def say(ctx: EvalContext, message: str) -> None:
    """Print on the main process only."""
    if ctx.accelerator.is_main_process:
        ctx.console.print(message)


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


def eval_batches(ctx: EvalContext, split: str) -> Iterator[Batch]:
    rows = getattr(ctx.data, split)
    if rows is None or len(rows) == 0:
        return iter(())
    cfg = ctx.cfg
    if cfg.data.packing and cfg.task == "causal_lm":
        rows = pack(rows, cfg.train.seq_len, cfg.train.seed, ctx.tokenizer.pad_token_id)
    loader = ShardedLoader(
        rows,
        batch_size=cfg.eval.batch_size or ctx.layout.micro_batch_size,
        rank=ctx.accelerator.process_index,
        world_size=ctx.accelerator.num_processes,
        seed=cfg.train.seed,
        shuffle=False,
        collate=make_collator(cfg, ctx.tokenizer, attention_implementation(ctx.model)),
        drop_last=False,
    )
    # Sharded engines (ZeRO-3, FSDP2) gather weights inside forward: every process must
    # run the same number of forwards, so a process short of rows repeats its last batch
    # with every label masked (it adds nothing to the loss).
    count = loader.batches_per_epoch
    if cfg.eval.max_batches is not None:
        count = min(count, cfg.eval.max_batches)
    return _fill_batches(loader.iter_epoch(), count, lambda: loader.collate([rows[0]]))


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


def evaluate_run(run: Run, split: str = "validation") -> dict[str, Any]:
    """`evaluate_split` at the run's step; a validation result becomes its last_eval."""
    result = evaluate_split(run, split, run.state.step)
    if split == "validation":
        run.state.last_eval = result
    return result


def evaluate_split(ctx: EvalContext, split: str, step: int) -> dict[str, Any]:
    """Eval loss/perplexity (all processes) and, if enabled, exact match (every process
    generates the same examples, so sharded engines stay in step), logged at `step`."""
    cfg = ctx.cfg
    result: dict[str, Any] = {}
    if getattr(ctx.data, split) is not None and cfg.task != "causal_lm":
        batches = eval_batches(ctx, split)
        result.update(evaluate_labeled(ctx.model, batches, ctx.accelerator, ctx.label_names))
    elif getattr(ctx.data, split) is not None:
        result.update(evaluate_loss(ctx.model, eval_batches(ctx, split), ctx.accelerator))
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
        say(ctx, f"step {step} {split}: {shown}")
    return result


def scalars(result: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in result.items() if isinstance(v, int | float)}


def load_best(run: Run) -> bool:
    """checkpoint.load_best_at_end: bring back the best checkpoint's weights (True if the
    weights changed)."""
    best = run.state.best
    if not (run.cfg.checkpoint.load_best_at_end and best):
        return False
    if best["step"] == run.state.step:
        return False
    path = ckpt.best_checkpoint(run.output_dir)
    if path is None:
        raise BigftError(f"{run.output_dir}: checkpoints/best.json names no complete checkpoint")
    ckpt.load_checkpoint(run.accelerator, path)
    say(run, f"loaded the best checkpoint {path} ({best_text(run)})")
    return True
