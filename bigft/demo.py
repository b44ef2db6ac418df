"""`bigft demo`: a tiny end-to-end fine-tune on CPU (plan, train, evaluate, export).

The base model is a small randomly initialized Llama with a character tokenizer, saved
with `save_pretrained` and loaded back through the same path as any real checkpoint. The
instruction data (string transformations of unseen words) ships with the package.
"""

from __future__ import annotations

import json
import random
import shutil
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
    return table


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
    from bigft.eval.metrics import exact_match
    from bigft.eval.split import generation_examples
    from bigft.loop.setup import setup
    from bigft.loop.train import train
    from bigft.tiny import save_tiny_base

    # The config (with the user's overrides) is checked before anything is touched.
    base_dir = output_dir / "base-model"
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
    _clear_previous_demo(output_dir, console)
    save_tiny_base(base_dir, **BASE_MODEL)
    run = setup(cfg, console)
    console.print(_plan_table(run))

    gen = cfg.eval.generate
    test_rows = run.data.test
    assert test_rows is not None, "the demo config names a test file"
    examples = generation_examples(test_rows, run.tokenizer, len(test_rows))

    def score() -> dict[str, Any]:
        return exact_match(
            run.model,
            run.tokenizer,
            examples,
            gen.max_new_tokens,
            gen.batch_size,
            run.accelerator.device,
        )

    before = score()
    console.print(
        f"exact match on {len(examples)} held-out rows before fine-tuning: "
        f"{before['exact_match']:.1%}"
    )
    summary = train(run)
    after = score()

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
        f"{result['exact_match_after']:.1%}[/] on held-out rows; model in {result['final_model']}"
    )
    return result
