"""Show what the model will be trained on: formatted examples with the masked span
visibly different, training rows next to their augmented copies (data.augment.text), then
the cleaning and length statistics and what cleaning removed, with example rows by file
and line (`bigft data preview`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from bigft.data.formats import IGNORE_INDEX
from bigft.data.pipeline import DROP_REASONS, PreparedData, SplitStats

MASKED_STYLE = "dim bright_black"
BASE_REASONS = ("empty", "duplicate", "too_long")
TARGET_STYLE = "bold green"


def render_example(input_ids: Sequence[int], labels: Sequence[int], tokenizer: Any) -> Text:
    """The decoded row: tokens with label -100 dim grey, target tokens green.

    Consecutive tokens of the same kind are decoded together, so multi-token characters
    and words come out whole; special tokens stay visible (they are trained on too).
    """
    text = Text()
    start = 0
    for end in range(1, len(input_ids) + 1):
        if end < len(input_ids) and (labels[end] == IGNORE_INDEX) == (
            labels[start] == IGNORE_INDEX
        ):
            continue
        piece = tokenizer.decode(list(input_ids[start:end]), skip_special_tokens=False)
        text.append(piece, style=MASKED_STYLE if labels[start] == IGNORE_INDEX else TARGET_STYLE)
        start = end
    return text


def stats_table(prepared: PreparedData) -> Table:
    """Rows kept and dropped (and why), truncation, token lengths per split."""
    table = Table(title=f"data (seq_len {prepared.stats.seq_len})")
    table.add_column("split")
    table.add_column("source", overflow="fold")
    splits = prepared.stats.splits.values()
    # The filters that are off by default get a column only when they dropped something.
    reasons = [
        r for r in DROP_REASONS if r in BASE_REASONS or any(s.dropped.get(r) for s in splits)
    ]
    augmented = any(s.augmented for s in splits)  # data.augment.text: counted in loaded
    counts = ("loaded", *(["augmented"] if augmented else []), "kept", *reasons)
    for name in (*counts, "truncated", "p50", "p90", "p99", "max"):
        table.add_column(name, justify="right")
    table.add_column("target tokens", justify="right")
    for name, s in prepared.stats.splits.items():
        table.add_row(
            name,
            s.source,
            str(s.rows_loaded),
            *([str(s.augmented)] if augmented else []),
            str(s.rows_kept),
            *(str(s.dropped.get(r, 0)) for r in reasons),
            str(s.truncated),
            str(s.length_p50),
            str(s.length_p90),
            str(s.length_p99),
            str(s.length_max),
            f"{s.target_tokens:,}",
        )
    if prepared.stats.packing_efficiency is not None:
        table.caption = (
            f"packing: {prepared.stats.packed_rows} rows, "
            f"{prepared.stats.packing_efficiency:.1%} of tokens are real (not padding)"
        )
    return table


def preview(prepared: PreparedData, tokenizer: Any, console: Console, n: int = 3) -> None:
    """Print `n` training examples as the model sees them, then the statistics table."""
    legend = Text.assemble(
        ("not trained on (label -100)", MASKED_STYLE), "  ", ("trained on", TARGET_STYLE)
    )
    console.print(legend)
    for i in range(min(n, len(prepared.train))):
        row = prepared.train[i]
        title = f"train example {i} ({len(row['input_ids'])} tokens)"
        if console.is_terminal:
            console.rule(title)
        else:  # a rule spans the console, which has no width in a file
            console.print(f"--- {title} ---", highlight=False)
        console.print(render_example(row["input_ids"], row["labels"], tokenizer))
    train = prepared.stats.splits.get("train")
    for line in augmentation_examples(train, n) if train is not None else []:
        console.print(line, soft_wrap=True)
    console.print(stats_table(prepared))
    for name, stats in prepared.stats.splits.items():
        for line in removal_report(name, stats):
            # Long lines stay whole: a location is meant to be copied.
            console.print(line, soft_wrap=True)


def augmentation_examples(stats: SplitStats, n: int) -> list[Text]:
    """Up to `n` training rows' texts, each followed by its augmented copies (the texts
    that were tokenized for training), labelled original / copy k (technique)."""
    if not stats.augmented_examples:
        return []
    lines = [
        Text(
            f"--- text augmentation (data.augment.text): {stats.augmented} rows added to "
            "train; original rows and their augmented copies ---"
        )
    ]
    for example in stats.augmented_examples[:n]:
        lines.append(Text(example["location"], style="cyan"))
        versions = [("original", example["original"])] + [
            (f"copy {k} ({c['technique']})", c["texts"]) for k, c in enumerate(example["copies"], 1)
        ]
        # A field empty in every version (an alpaca row without input) is not shown.
        shown = [j for j in range(len(example["fields"])) if any(v[j] for _, v in versions)]
        for label, texts in versions:
            for j in shown:
                field = example["fields"][j]
                lines.append(Text.assemble(f"  {label:<30} ", (f"{field}: ", "bold"), texts[j]))
    return lines


def removal_report(name: str, stats: SplitStats) -> list[Text]:
    """What augmentation added to one split (data.augment.text), then what cleaning
    removed from it and why: rows per reason and, under each, the example rows recorded
    (location, why, start of the trained-on text)."""
    added = []
    if stats.augmented:
        added = [
            Text(
                f"added to {name}: {stats.augmented} augmented rows (data.augment.text; "
                "cleaned like any row)"
            )
        ]
    dropped = {r: n for r, n in stats.dropped.items() if n}
    if not dropped:
        return [*added, Text(f"removed from {name}: nothing")]
    lines = [
        *added,
        Text(f"removed from {name}: {sum(dropped.values())} of {stats.rows_loaded} rows"),
    ]
    for reason, count in dropped.items():
        lines.append(Text.assemble("  ", (reason, "bold"), f": {count}"))
        for example in stats.removed.get(reason, []):
            line = Text.assemble("    ", (example["location"], "cyan"))
            if example.get("detail"):
                line.append(f"  {example['detail']}")
            if example.get("text"):
                line.append(f"  {example['text']!r}", style="dim")
            lines.append(line)
    return lines
