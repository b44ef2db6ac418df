"""`bigft demo`: a tiny end-to-end fine-tune on CPU (plan, train, evaluate, export).

The base model is a small randomly initialized Llama with a character tokenizer, saved
with `save_pretrained` and loaded back through the same path as any real checkpoint. The
instruction data (string transformations of unseen words) ships with the package.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bigft.errors import BigftError

DEMO_DIR = Path(__file__).parent / "demo_data"
DEMO_CONFIG = DEMO_DIR / "demo.yaml"
BASE_MODEL = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4}

TASKS = {
    "Uppercase:": str.upper,
    "Reverse:": lambda w: w[::-1],
    "Double:": lambda w: w + w,
}


def make_rows(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict[str, str]]:  # type: ignore[assignment]
    """Alpaca rows over random lowercase words (how demo_data/*.jsonl was made)."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen = set(exclude)
    while len(rows) < n:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
        if word in seen:
            continue
        seen.add(word)
        instruction = rng.choice(sorted(TASKS))
        rows.append({"instruction": instruction, "input": word, "output": TASKS[instruction](word)})
    return rows


def write_demo_data(out_dir: Path = DEMO_DIR) -> None:
    """Regenerate the shipped files: held-out words never appear in training."""
    test = make_rows(120, seed=2)
    train = make_rows(3000, seed=1, exclude={r["input"] for r in test})
    for name, rows in (("train", train), ("test", test)):
        with (out_dir / f"{name}.jsonl").open("w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)


def _plan_table(run: Any) -> Table:
    """What the run will hold in memory (fp32 weights, grads, AdamW states) and its batch."""
    from bigft.model.load import count_parameters

    trainable, total = count_parameters(run.accelerator.unwrap_model(run.model))
    mib = 1024**2
    table = Table(title="plan", show_header=False)
    table.add_row("parameters", f"{total:,} ({trainable:,} trainable)")
    table.add_row("weights fp32", f"{total * 4 / mib:.1f} MiB")
    table.add_row("gradients fp32", f"{trainable * 4 / mib:.1f} MiB")
    table.add_row("AdamW states", f"{trainable * 8 / mib:.1f} MiB")
    table.add_row(
        "batch",
        f"{run.layout.micro_batch_size} rows x {run.cfg.train.seq_len} tokens x accum "
        f"{run.layout.grad_accum} x {run.layout.world_size} process(es)",
    )
    table.add_row("steps", str(run.total_steps))
    table.add_row("compute threads", _threads_text())
    return table


def _threads_text() -> str:
    import torch

    source = (
        "OMP_NUM_THREADS" if "OMP_NUM_THREADS" in os.environ else "set OMP_NUM_THREADS to change"
    )
    return f"{torch.get_num_threads()} ({source})"


def use_one_thread_unless_asked() -> None:
    """One compute thread unless OMP_NUM_THREADS says otherwise. The demo's model is
    small: on an idle 2-core machine two threads train faster but the whole demo takes
    about as long (generation runs token by token), while on a busy machine threads wait
    on cores other jobs hold and training ran 2.8x slower with two than with one
    (bench/demo_busy.py)."""
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)


def _clear_previous_demo(output_dir: Path, console: Console) -> None:
    """A previous demo run in `output_dir` (the demo made all of it) is removed; any
    other non-empty directory is refused."""
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    made_by_demo = (output_dir / "demo_summary.json").is_file() or (
        (output_dir / "base-model" / "config.json").is_file()
        and (output_dir / "config.yaml").is_file()
    )
    if not made_by_demo:
        raise BigftError(
            f"--output-dir {output_dir} holds files that are not a previous demo run; "
            "choose another directory"
        )
    shutil.rmtree(output_dir)
    console.print(f"removed the previous demo run in {output_dir}", highlight=False)


def run_demo(output_dir: Path, overrides: list[str], console: Console) -> dict[str, Any]:
    """Make the base model, score it, fine-tune, score again, export, show generations."""
    from bigft.config_io import load_config
    from bigft.eval.during_training import evaluate_run
    from bigft.loop.setup import setup
    from bigft.loop.train import train
    from bigft.tiny import save_tiny_base

    # The config (with the user's overrides) is checked before anything is touched. The
    # base model does not exist yet: an absolute path keeps a short relative one (`-o demo`
    # gives `demo/base-model`) from being read as a hub id.
    base_dir = output_dir.absolute() / "base-model"
    cfg = load_config(
        DEMO_CONFIG,
        [
            f"model.name_or_path={base_dir}",
            f"output_dir={output_dir}",
            f"data.prepared_dir={output_dir / 'prepared-data'}",  # all of it in one folder
            "train.resume=never",
            *overrides,
        ],
    )
    if output_dir.exists() and not output_dir.is_dir():
        raise BigftError(f"--output-dir {output_dir} is a file; choose a directory path")
    use_one_thread_unless_asked()
    _clear_previous_demo(output_dir, console)
    save_tiny_base(base_dir, **BASE_MODEL)
    run = setup(cfg, console)
    console.print(_plan_table(run))

    # One definition of the demo's score everywhere (this output, metrics.jsonl,
    # summary.json, the report, `bigft eval`): the test split's exact match over
    # eval.generate.num_examples rows, which the demo config sets to all of them.
    assert run.data.test is not None, "the demo config names a test file"
    rows = min(cfg.eval.generate.num_examples, len(run.data.test))
    before = evaluate_run(run, "test")  # logged at step 0, like any evaluation
    console.print(
        f"exact match on the {rows} held-out test rows before fine-tuning: "
        f"{before['exact_match']:.1%}"
    )
    summary = train(run)
    after = summary["test"]

    table = Table(title="held-out generations (after fine-tuning)")
    for column in ("prompt", "reference", "prediction"):
        table.add_column(column)
    for sample in after["samples"][:6]:
        table.add_row(
            sample["prompt"].replace("\n", " | "), sample["reference"], sample["prediction"]
        )
    console.print(table)
    result = {
        "exact_match_before": before["exact_match"],
        "exact_match_after": after["exact_match"],
        "test_loss": summary.get("test", {}).get("eval_loss"),
        "final_model": summary.get("final_model"),
    }
    (output_dir / "demo_summary.json").write_text(json.dumps(result, indent=2))
    console.print(
        f"[bold]exact match {result['exact_match_before']:.1%} -> "
        f"{result['exact_match_after']:.1%}[/] on the {rows} held-out test rows "
        f"(summary.json test.exact_match); model in {result['final_model']}"
    )
    return result


@contextlib.contextmanager
def demo_base_for_preview(config: Path, cfg: Any, console: Console) -> Iterator[Any]:
    """The demo's config previews without running the demo first: its base model (made
    by `bigft demo`) is made in a temporary folder for as long as the block runs."""
    same = config.resolve() == DEMO_CONFIG.resolve()
    if not same or Path(cfg.model.name_or_path).is_dir():
        yield cfg
        return
    from bigft.tiny import save_tiny_base

    with tempfile.TemporaryDirectory(prefix="bigft-demo-base-") as tmp:
        save_tiny_base(Path(tmp), **BASE_MODEL)
        console.print(
            "the demo's base model is made by `bigft demo`; previewing with a fresh copy of "
            "it (its character tokenizer)",
            highlight=False,
        )
        model = cfg.model.model_copy(update={"name_or_path": tmp})
        yield cfg.model_copy(update={"model": model})
