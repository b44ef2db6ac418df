"""`bigft export --quantize` and `bigft prune`: smaller exports of a run's final model.

Both score the run's own final model and the export with `bigft eval`'s machinery, on
the run's test split (its validation split when it declares no test split), and print
one line: size, parameters, sparsity, the run's eval.metric and eval_loss before and
after. The numbers are in compression_report.json beside the export.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from bigft.commands.common import console, out, quiet_libraries, user_errors
from bigft.errors import BigftError
from bigft.model.checks import holds_preprocessor

FORMATS_HELP = (
    "Write a quantized model instead (an adapter is merged first): int8 or nf4 "
    "(bitsandbytes; reloads with from_pretrained), gguf:q8_0 or gguf:f16 (one .gguf file "
    "for llama.cpp; Llama and Mistral). Scored before and after."
)


def export_quantized(run_dir: Path, out_dir: Path, fmt: str, merge: bool, overwrite: bool) -> None:
    """`bigft export RUN --quantize FORMAT --out DIR`."""
    from bigft.model.compress import check_format

    check_format(fmt)
    if merge:
        raise BigftError("--merge: --quantize merges an adapter into its base anyway; drop --merge")
    quiet_libraries()
    from bigft.model.compress import quantize_run

    report_lines(quantize_run(run_dir, out_dir, fmt, overwrite, score=run_scorer(run_dir)))


@user_errors
def prune(
    run_dir: Path = typer.Argument(..., help="Run directory (its output_dir).", show_default=False),
    out_dir: Path = typer.Option(
        ..., "--out", "-o", help="Directory to write.", show_default=False
    ),
    sparsity: float = typer.Option(
        ..., "--sparsity", help="Fraction of each pruned layer's weights set to zero, e.g. 0.5."
    ),
    pattern: str = typer.Option(
        "unstructured",
        "--pattern",
        help="unstructured: the smallest-magnitude weights of each layer; 2:4: 2 of every 4 "
        "consecutive input weights (needs --sparsity 0.5).",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing --out that is not a bigft export."
    ),
) -> None:
    """Magnitude-prune the linear layers inside the model's layer stack (attention and MLP
    projections; embeddings, the LM head and classification heads are not pruned; an
    adapter is merged into its base first), save the model (dense safetensors holding
    zeros) and score it before and after."""
    from bigft.model.prune import check_pruning

    check_pruning(sparsity, pattern)
    quiet_libraries()
    from bigft.model.compress import prune_run

    report = prune_run(run_dir, out_dir, sparsity, pattern, overwrite, score=run_scorer(run_dir))
    report_lines(report)


def run_scorer(run_dir: Path) -> Any:
    """score(None): the run's final model (an adapter on its base, as `bigft eval RUN`);
    score(DIR): the model in DIR with the run's config (task, data, seq_len, eval)."""
    from bigft.config_io import load_config
    from bigft.eval.standalone import EvalJob, NothingToScore, evaluation_job, run_evaluation

    def score(model_dir: Path | None) -> dict[str, Any] | None:
        with evaluation_job(run_dir, None, None, []) as job:
            data = job.cfg.data
            split = "test" if data.test is not None or data.split.test > 0 else "validation"
            if split == "validation" and data.validation is None and not data.split.validation:
                return None  # nothing held out: the report says so
            if model_dir is None:
                job = replace(job, splits=(split,))
            else:
                model: dict[str, Any] = {"name_or_path": str(model_dir), "revision": None}
                if holds_preprocessor(model_dir):
                    model["tokenizer"] = str(model_dir)
                values = [f"model.{k}={json.dumps(v)}" for k, v in model.items()]
                cfg = load_config(run_dir / "config.yaml", ["train.resume=never", *values])
                job = EvalJob(cfg, (split,))
            # bitsandbytes' int8 matmul logs at every call that it casts inputs to fp16
            noisy = logging.getLogger("bitsandbytes.autograd._functions")
            level = noisy.level
            noisy.setLevel(logging.ERROR)
            try:
                results = run_evaluation(job, console)[split]
            except NothingToScore:
                return None  # every held-out row was dropped (duplicates): the report says so
            finally:
                noisy.setLevel(level)
        metric = job.cfg.eval.metric
        keys = dict.fromkeys(["eval_loss", metric])
        return {"split": split, **{k: results.get(k) for k in keys}}

    return score


def report_lines(report: dict[str, Any]) -> None:
    """One line for the export: what changed and the scores before and after."""
    size, params = report["size_bytes"], report["parameters"]
    parts = [
        f"{report['format']} -> {report['output']}:",
        f"size {_mb(size['before'])} -> {_mb(size['after'])} MB "
        f"({size['after'] / max(size['before'], 1):.2f}x),",
        f"{params['before']:,} -> {params['after']:,} parameters",
    ]
    if report.get("sparsity"):
        sparse = report["sparsity"]
        parts[-1] += ","
        parts.append(
            f"sparsity {sparse['pruned_layers_sparsity']:.1%} of pruned layers, "
            f"{sparse['overall_sparsity']:.1%} of all weights"
        )
    before, after = report.get("before"), report.get("after")
    if before is not None:
        scores = []
        for key in (k for k in before if k != "split"):
            new = "not measured" if after is None else _num(after.get(key))
            scores.append(f"{key} {_num(before[key])} -> {new}")
        parts[-1] += ";"
        parts.append(f"{before['split']} " + ", ".join(scores))
    out.print(" ".join(parts), highlight=False, soft_wrap=True, markup=False)
    if report.get("after_not_measured"):
        console.print(f"note: {report['after_not_measured']}", highlight=False, markup=False)
    from bigft.model.compress import REPORT

    where = Path(report["output"])
    folder = where if where.is_dir() else where.parent
    console.print(f"[green]wrote[/] {folder / REPORT}", highlight=False)


def _mb(size: int) -> str:
    return f"{size / 1e6:,.2f}"


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"
