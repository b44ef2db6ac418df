"""Preference data (task preference): rows rendered by `bigft.data.preference_rows`, split
and cleaned as SFT rows are, and batched for one forward per micro-batch.

Columns: `chosen_input_ids`, `chosen_labels`, `rejected_input_ids`, `rejected_labels`
(dpo, ipo, simpo, orpo), or `input_ids`, `labels`, `desirable` (kto). Every bad row is
reported by file and line before any model is loaded; exact duplicate pairs are dropped
(data.drop_duplicates), over-long pairs with data.overlong drop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets

from bigft.config import Config, DataConfig, PreferenceConfig
from bigft.data.dedup import ExactDuplicates
from bigft.data.formats import IGNORE_INDEX
from bigft.data.pipeline import SPLITS, DataStats, PreparedData, SplitStats, assemble_splits
from bigft.data.preference_rows import BOOKKEEPING, PreferenceEncoder
from bigft.data.sources import load_rows, row_location
from bigft.errors import DataError


def prepare_preference(cfg: Config, tokenizer: Any) -> PreparedData:
    """The run's preference data (see `prepare_preference_data`)."""
    return prepare_preference_data(
        cfg.data, cfg.preference, tokenizer, cfg.train.seq_len, cfg.train.seed
    )


def prepare_preference_data(
    data: DataConfig, pref: PreferenceConfig, tokenizer: Any, seq_len: int, seed: int
) -> PreparedData:
    """Load, render, validate, split and clean preference rows. Columns: `chosen_input_ids`,
    `chosen_labels`, `rejected_input_ids`, `rejected_labels` (kto: `input_ids`, `labels`,
    `desirable`). Raises DataError naming file and line for the first bad row, and when
    no training row is left."""
    encode = PreferenceEncoder(data, pref, tokenizer, seq_len)

    def load_file(path: str) -> Dataset:
        raw = load_rows(path)
        num_proc = min(data.num_proc, len(raw))
        out = raw.map(
            encode,
            batched=True,
            remove_columns=raw.column_names,
            features=encode.features,
            num_proc=num_proc if num_proc > 1 else None,
            load_from_cache_file=False,
            keep_in_memory=True,  # the prepared-data store keeps the result
            desc=f"tokenizing {path}",
        )
        errors = out["error"]
        bad = next((i for i, e in enumerate(errors) if e), None)
        if bad is not None:
            raise DataError(f"{row_location(path, bad)}: {errors[bad]}")
        out = out.add_column("source", [path] * len(out))
        return out.add_column("row", np.arange(len(out), dtype=np.int64))

    def load(paths: list[str]) -> Dataset:
        parts = [load_file(path) for path in paths]
        return parts[0] if len(parts) == 1 else concatenate_datasets(parts)

    parts, sources = assemble_splits(data, load, seed)
    # One set of digests over the splits in order: a pair repeated across splits leaves
    # validation / test, never train.
    seen = ExactDuplicates([parts[name] for name in SPLITS if name in parts])
    cleaned: dict[str, Dataset | None] = {}
    stats: dict[str, SplitStats] = {}
    for name in SPLITS:
        if name in parts:
            cleaned[name], stats[name] = _clean(parts[name], sources[name], seen, data, seq_len)
            seen.next_split()
    train = cleaned["train"]
    if train is None:
        s = stats["train"]
        raise DataError(
            f"{sources['train']}: no training rows left ({s.rows_loaded} loaded; dropped "
            + ", ".join(f"{k} {v}" for k, v in s.dropped.items() if v)
            + "); check data.overlong and train.seq_len"
        )
    return PreparedData(
        train, cleaned.get("validation"), cleaned.get("test"), DataStats(seq_len, stats)
    )


def _clean(
    ds: Dataset, source: str, seen: ExactDuplicates, data: DataConfig, seq_len: int
) -> tuple[Dataset | None, SplitStats]:
    """Drop exact duplicate and (data.overlong drop) over-long rows; count the rest."""
    stats = SplitStats(source=source, rows_loaded=len(ds))
    cols = ds.select_columns(["too_long", "length", "tokens", "targets", "truncated"])
    arrays = cols.with_format("numpy")[:]
    keep = np.zeros(len(ds), dtype=bool)
    for i, too_long in enumerate(arrays["too_long"].tolist()):
        if data.drop_duplicates and i in seen:
            reason = "duplicate"
        elif too_long:
            reason = "too_long"
        else:
            keep[i] = True
            seen.add(i)
            continue
        stats.dropped[reason] += 1
        shown = stats.removed.setdefault(reason, [])
        if len(shown) < 2:
            where = row_location(ds[i]["source"], ds[i]["row"])
            detail = (
                "repeats an earlier row"
                if reason == "duplicate"
                else f"{arrays['length'][i]} tokens, more than train.seq_len {seq_len}"
            )
            shown.append({"location": where, "detail": detail})
    kept = np.flatnonzero(keep)
    stats.rows_kept = len(kept)
    if not len(kept):
        return None, stats
    lengths = arrays["length"][kept]
    stats.length_p50, stats.length_p90, stats.length_p99 = (
        int(np.percentile(lengths, q, method="nearest")) for q in (50, 90, 99)
    )
    stats.length_max = int(lengths.max())
    stats.tokens = int(arrays["tokens"][kept].sum())
    stats.target_tokens = int(arrays["targets"][kept].sum())
    stats.truncated = int(arrays["truncated"][kept].sum())
    return ds.select(kept).remove_columns([*BOOKKEEPING, "source", "row"]), stats


class PreferenceCollator:
    """Preference rows -> one padded batch the model runs once.

    Pairs: B rows -> 2B sequences [chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]
    and `pair_rows` = B (a 0-dim long tensor), so the loss splits the log-probabilities
    at B. Rows with precomputed reference log-probabilities (columns `ref_chosen`,
    `ref_rejected`) add `ref_logps` (2B, in the same order).

    kto: B rows -> their B sequences, `desirable` (B bools), then `kl_rows` = K more
    sequences for KTO's reference point z0 (as TRL's KTOTrainer): row i's prompt with the
    completion of row (i + 1) mod B, a mismatched pair whose log-ratio to the reference
    estimates the KL term. K = B, or 0 when B == 1 (no other completion: z0 = 0). A
    mismatched sequence is no longer than the longer of its two rows (its completion's
    end is cut), so it stays within train.seq_len.

    Right-padded to the longest sequence: `input_ids` (pad_token_id), `attention_mask`,
    `labels` (-100 on padding). A row whose labels are all -100 (an evaluation filler)
    counts for nothing.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if "chosen_input_ids" in rows[0]:
            seqs = [
                (list(r[f"{side}_input_ids"]), list(r[f"{side}_labels"]))
                for side in ("chosen", "rejected")
                for r in rows
            ]
            batch = {**self.pad(seqs), "pair_rows": torch.tensor(len(rows), dtype=torch.long)}
            if "ref_chosen" in rows[0]:  # preference.precompute_reference
                batch["ref_logps"] = torch.tensor(
                    [float(r[f"ref_{side}"]) for side in ("chosen", "rejected") for r in rows],
                    dtype=torch.float32,
                )
            return batch
        seqs = [(list(r["input_ids"]), list(r["labels"])) for r in rows]
        kl = _mismatched(seqs) if len(seqs) > 1 else []
        batch = self.pad(seqs + kl)
        batch["desirable"] = torch.tensor([bool(r["desirable"]) for r in rows], dtype=torch.bool)
        batch["kl_rows"] = torch.tensor(len(kl), dtype=torch.long)
        return batch

    def pad(self, seqs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in seqs)
        batch = {
            "input_ids": torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(seqs), width), dtype=torch.long),
            "labels": torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long),
        }
        for i, (ids, labels) in enumerate(seqs):
            batch["input_ids"][i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            batch["attention_mask"][i, : len(ids)] = 1
            batch["labels"][i, : len(ids)] = torch.tensor(labels, dtype=torch.long)
        return batch


def _mismatched(seqs: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
    """Row i's prompt + row (i + 1)'s completion (the prompt ends at the first target)."""
    starts = [
        next((j for j, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        for _, labels in seqs
    ]
    out = []
    for i, (ids, labels) in enumerate(seqs):
        if starts[i] == len(ids):  # a filler row: its mismatched sequence is one too
            out.append((ids, [IGNORE_INDEX] * len(ids)))
            continue
        k = (i + 1) % len(seqs)
        other_ids, other_labels = seqs[k]
        room = max(len(ids), len(other_ids)) - starts[i]
        tail = slice(starts[k], starts[k] + room)
        out.append((ids[: starts[i]] + other_ids[tail], labels[: starts[i]] + other_labels[tail]))
    return out
