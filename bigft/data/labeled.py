"""Rows with a label: data for `task: classification` and `task: regression`.

Each row holds a text (data.text_field), optionally a second text (data.text_pair_field)
and a label (data.label_field). Class labels may be strings or integers: strings are
mapped to ids through data.label_names (default: the sorted distinct training labels),
integers index that list. Splits, seeds and error messages follow the causal-LM pipeline:
every bad row is reported by file and line before any model is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from bigft.config import IMAGE_TASKS, Config, DataConfig, PreferenceConfig
from bigft.data.augment_rows import RowTexts, augment_split
from bigft.data.augment_text import TextAugmenter
from bigft.data.labels import label_names_from, map_checked
from bigft.data.packing import Collator, needs_flat_packing
from bigft.data.pipeline import (
    DataStats,
    PreparedData,
    SplitStats,
    assemble_splits,
    prepare_data,
)
from bigft.data.preference import PreferenceCollator, prepare_preference_data
from bigft.data.sources import load_rows, row_location

IGNORE_LABEL = -100


class _Encode:
    """Row -> input ids (truncated to seq_len) and label id / value, or an error string."""

    def __init__(
        self, cfg: DataConfig, tokenizer: Any, seq_len: int, names: list[str] | None
    ) -> None:
        self.cfg, self.tokenizer, self.seq_len = cfg, tokenizer, seq_len
        self.ids = {name: i for i, name in enumerate(names)} if names is not None else None
        # Integer labels in the file index data.label_names when those are the class names.
        self.numeric_names = names is not None and all(n.lstrip("-").isdigit() for n in names)

    def text(self, row: Mapping[str, Any], field: str) -> str:
        value = row.get(field)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"'{field}' is missing or not a non-empty string")
        return value

    def label(self, row: Mapping[str, Any]) -> float | int:
        value = row.get(self.cfg.label_field)
        if value is None or isinstance(value, bool):
            raise ValueError(f"'{self.cfg.label_field}' is missing")
        if self.ids is None:  # regression
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"'{self.cfg.label_field}' {value!r} is not a number") from None
            if not math.isfinite(number):
                raise ValueError(f"'{self.cfg.label_field}' {value!r} is not finite")
            return number
        key = str(value)
        if key in self.ids:
            return self.ids[key]
        if isinstance(value, int) and not self.numeric_names and 0 <= value < len(self.ids):
            return value
        raise ValueError(f"label {value!r} is not one of data.label_names {list(self.ids)[:10]}")

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"input_ids": [], "label": [], "error": [], "length": []}
        size = len(next(iter(batch.values()))) if batch else 0
        for i in range(size):
            row = {key: values[i] for key, values in batch.items()}
            try:
                text = self.text(row, self.cfg.text_field)
                pair = (
                    self.text(row, self.cfg.text_pair_field) if self.cfg.text_pair_field else None
                )
                label = self.label(row)
                enc = self.tokenizer(text, pair, truncation=True, max_length=self.seq_len)
                ids, error = list(enc["input_ids"]), ""
            except ValueError as exc:
                ids, label, error = [], 0, str(exc)
            out["input_ids"].append(ids)
            out["label"].append(float(label) if self.ids is None else int(label))
            out["error"].append(error)
            out["length"].append(len(ids))
        return out


def prepare_for_task(
    cfg: DataConfig,
    tokenizer: Any,
    seq_len: int,
    seed: int,
    task: str,
    preference: PreferenceConfig | None = None,
) -> tuple[PreparedData, list[str] | None]:
    """The rows of any task: token rows for causal_lm, preference rows (read as section
    `preference` says) for preference, labelled rows (and the class names, None for
    regression) otherwise."""
    if task == "preference":
        pref = preference or PreferenceConfig()
        return prepare_preference_data(cfg, pref, tokenizer, seq_len, seed), None
    if task == "causal_lm":
        return prepare_data(cfg, tokenizer, seq_len, seed), None
    return prepare_labeled(cfg, tokenizer, seq_len, seed, task)


def prepare_labeled(
    cfg: DataConfig, tokenizer: Any, seq_len: int, seed: int, task: str
) -> tuple[PreparedData, list[str] | None]:
    """Tokenize, validate and split labelled rows; returns the data and the class names
    (None for regression)."""
    loaded: dict[str, Dataset] = {}

    def read(path: str) -> Dataset:  # the label scan and tokenization share one read
        if path not in loaded:
            loaded[path] = load_rows(path)
        return loaded[path]

    augment = cfg.augment.text
    augmenter = TextAugmenter(augment, seed) if augment is not None else None  # fails early
    names = label_names_from(cfg, read) if task == "classification" else None
    encode = _Encode(cfg, tokenizer, seq_len, names)

    def encode_rows(raw: Dataset, path: str) -> Dataset:
        """Encoded rows, with their `source` and `row` (what augmentation reads again)."""
        out = map_checked(raw, encode, f"tokenizing {path}", lambda i: row_location(path, i))
        out = out.add_column("source", [path] * len(out))
        return out.add_column("row", np.arange(len(out), dtype=np.int64))

    def load(paths: list[str]) -> Dataset:
        parts = [encode_rows(read(path), path) for path in paths]
        if len(parts) == 1:
            return parts[0]
        from datasets import concatenate_datasets

        return concatenate_datasets(parts)

    parts, sources = assemble_splits(cfg, load, seed)
    report = None
    if augmenter is not None:  # after the split: held-out rows are never augmented
        texts = RowTexts([cfg.text_field, *([cfg.text_pair_field] if cfg.text_pair_field else [])])
        parts["train"], report = augment_split(
            parts["train"],
            cfg.train_files,
            lambda i: texts,
            augmenter,
            lambda raw, i: encode_rows(raw, f"{cfg.train_files[i]} (augmented)"),
        )
    stats = {name: _stats(ds, sources[name], seq_len) for name, ds in parts.items()}
    if report is not None:
        stats["train"].augmented = report.added
        stats["train"].augmented_examples = report.examples
    bookkeeping = ["length", "source", "row"]
    cleaned = {name: ds.remove_columns(bookkeeping) for name, ds in parts.items()}
    data = PreparedData(
        cleaned["train"],
        cleaned.get("validation"),
        cleaned.get("test"),
        DataStats(seq_len=seq_len, splits=stats),
    )
    return data, names


def _stats(ds: Dataset, source: str, seq_len: int) -> SplitStats:
    lengths = np.asarray(ds["length"], dtype=np.int64)
    kept = np.minimum(lengths, seq_len)
    stats = SplitStats(source=source, rows_loaded=len(ds), rows_kept=len(ds))
    stats.truncated = int((lengths >= seq_len).sum())
    if len(kept):
        stats.length_p50, stats.length_p90, stats.length_p99 = (
            int(np.percentile(kept, q, method="nearest")) for q in (50, 90, 99)
        )
        stats.length_max = int(kept.max())
        stats.tokens = int(kept.sum())
    stats.target_tokens = len(ds)  # one target per row
    return stats


class LabelCollator:
    """Rows -> right-padded input_ids / attention_mask and a 1-D `labels` tensor (class ids
    as long, regression targets as float). A -100 class label marks a filler row."""

    def __init__(self, pad_token_id: int, regression: bool) -> None:
        self.pad_token_id = pad_token_id
        self.regression = regression

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.as_tensor(list(row["input_ids"]))
            mask[i, :n] = 1
        dtype = torch.float32 if self.regression else torch.long
        labels = torch.tensor([r["label"] for r in rows], dtype=dtype)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_collator(
    cfg: Config,
    tokenizer: Any,
    attn_implementation: str | None = None,
    label_names: Sequence[str] | None = None,
    train: bool = False,
) -> Callable[[list[Any]], dict[str, torch.Tensor]]:
    """Batches for the task: token rows (packed or padded), labelled rows, or images.

    `attn_implementation` is the one the loaded model runs: packed rows are flattened to
    one row when it isolates sequences only in that shape (flash-attention). `tokenizer`
    is the task's preprocessor (an image processor, a processor). Contrastive batches
    carry the class prompts of `label_names` for evaluation (zero-shot accuracy), and in
    training (`train`) when contrastive.classification_weight asks for them."""
    if cfg.task == "preference":
        return PreferenceCollator(tokenizer.pad_token_id)
    if cfg.task in IMAGE_TASKS:
        from bigft.data.images import ImageCollator

        contrastive = cfg.task == "contrastive"
        wanted = not train or cfg.contrastive.classification_weight > 0
        prompts = (
            [cfg.contrastive.prompt.replace("{label}", name) for name in label_names]
            if contrastive and label_names and wanted
            else None
        )
        return ImageCollator(
            tokenizer,
            cfg.data.augment.image,
            cfg.train.seed,
            prompts,
            cfg.train.seq_len if contrastive else None,
            contrastive,
        )
    if cfg.task == "causal_lm":
        flat = cfg.data.packing and needs_flat_packing(attn_implementation)
        return Collator(tokenizer.pad_token_id, packed=cfg.data.packing, flatten=flat)
    return LabelCollator(tokenizer.pad_token_id, regression=cfg.task == "regression")
