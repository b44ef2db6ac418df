"""Show what the model will be trained on: formatted examples with the masked span
visibly different, then the cleaning and length statistics (`bigft data preview`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from bigft.data.formats import IGNORE_INDEX
from bigft.data.pipeline import DROP_REASONS, PreparedData

MASKED_STYLE = "dim bright_black"
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
    for name in ("loaded", "kept", *DROP_REASONS, "truncated", "p50", "p90", "p99", "max"):
        table.add_column(name, justify="right")
    table.add_column("target tokens", justify="right")
    for name, s in prepared.stats.splits.items():
        table.add_row(
            name,
            s.source,
            str(s.rows_loaded),
            str(s.rows_kept),
            *(str(s.dropped[r]) for r in DROP_REASONS),
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
        console.rule(f"train example {i} ({len(row['input_ids'])} tokens)")
        console.print(render_example(row["input_ids"], row["labels"], tokenizer))
    console.print(stats_table(prepared))
