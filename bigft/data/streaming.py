"""Streaming training data (`data.streaming: true`): corpora read, formatted, tokenized and
packed on the fly, never held whole in memory or on disk.

Each source of data.train is a `datasets` IterableDataset (a file, a directory of data
files, or `hub:NAME`); a mixture of weighted sources is interleaved with those weights.
Ranks take disjoint rows (`split_dataset_by_node`), loader workers disjoint files.
Within a window of `WINDOW` rows a rank shuffles (seeded by seed, epoch and the window's
first row) and best-fit packs into seq_len rows; everything is a `datasets` map, so the
stream's state, saved through torchdata's `StatefulDataLoader` in every checkpoint, resumes
at the exact row. Rows without targets, shorter than data.min_tokens or, with
data.languages, in another language are dropped, over-long rows truncated or dropped as
data.overlong says; duplicates (exact or near) are not removed: that needs the whole corpus.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets import Dataset, Features, IterableDataset, List, Value
from datasets.distributed import split_dataset_by_node

from bigft.config import DataConfig, SplitConfig, TrainSource
from bigft.data.clean import (
    LANGUAGE_MIN_SCORE,
    LANGUAGE_TOKENS,
    detect_languages,
    language_detector,
)
from bigft.data.formats import IGNORE_INDEX, Formatter
from bigft.data.loader import data_loader
from bigft.data.packing import bin_pack
from bigft.data.pipeline import DataStats, PreparedData, SplitStats, formatter_for, prepare_data
from bigft.data.sources import _BUILDERS, row_location
from bigft.errors import DataError, RowError

WINDOW = 1024  # rows shuffled and packed together


def stream_source(path: str) -> IterableDataset:
    """The raw rows of one source, streamed."""
    if path.startswith("hub:"):
        name = path.removeprefix("hub:")
        try:
            return datasets.load_dataset(name, split="train", streaming=True)
        except Exception as exc:
            raise DataError(
                f"{path}: could not stream hub dataset '{name}' ({str(exc).splitlines()[0]}); "
                "check the name and network access"
            ) from None
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: data file not found (check data.train)")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in _BUILDERS) if p.is_dir() else [p]
    kinds = {_BUILDERS.get(f.suffix.lower()) for f in files}
    if not files or None in kinds or len(kinds) != 1:
        raise DataError(
            f"{path}: data.streaming reads a data file, or a directory of data files of one "
            f"type ({', '.join(sorted(_BUILDERS))})"
        )
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        return datasets.load_dataset(
            kinds.pop(), data_files=[str(f) for f in files], split="train", streaming=True
        )
    finally:
        datasets.logging.set_verbosity(verbosity)


def _encode(
    batch: dict[str, list[Any]],
    indices: list[int],
    formatter: Formatter,
    seq_len: int,
    overlong: str,
    path: str,
    min_tokens: int = 0,
    languages: list[str] | None = None,
) -> dict[str, list[Any]]:
    """Format and tokenize raw rows; keep those with targets, at least `min_tokens` long
    and, with `languages`, in one of them (a batched `datasets.map`)."""
    out: dict[str, list[Any]] = {"input_ids": [], "labels": []}
    size = len(next(iter(batch.values()))) if batch else 0
    for i in range(size):
        try:
            ids, labels = formatter({key: values[i] for key, values in batch.items()})
        except RowError as exc:
            where = row_location(path, indices[i]) if Path(path).is_file() else path
            raise DataError(f"{where}: {exc}") from None
        if len(ids) < min_tokens:
            continue
        if len(ids) > seq_len:
            if overlong == "drop":
                continue
            ids, labels = ids[:seq_len], labels[:seq_len]
        if any(label != IGNORE_INDEX for label in labels):
            out["input_ids"].append(ids)
            out["labels"].append(labels)
    if languages is not None and out["input_ids"]:
        out = _in_languages(out, formatter.tokenizer, languages)
    return out


def _in_languages(
    rows: dict[str, list[Any]], tokenizer: Any, languages: list[str]
) -> dict[str, list[Any]]:
    """The rows whose target text is not confidently in another language
    (`bigft.data.clean`'s rule for prepared data)."""
    texts = [
        tokenizer.decode(
            [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX][
                :LANGUAGE_TOKENS
            ],
            skip_special_tokens=True,
        )
        for ids, labels in zip(rows["input_ids"], rows["labels"], strict=True)
    ]
    found = detect_languages(_detector(), texts)
    keep = [
        k
        for k, (lang, score) in enumerate(found)
        if not (lang and lang not in languages and score >= LANGUAGE_MIN_SCORE)
    ]
    return {name: [values[k] for k in keep] for name, values in rows.items()}


@functools.cache
def _detector() -> Any:
    return language_detector()


def _window(
    batch: dict[str, list[Any]],
    indices: list[int],
    seed: int,
    epoch: int,
    seq_len: int,
    pad_token_id: int,
    packed: bool,
) -> dict[str, list[Any]]:
    """Shuffle one window of rows; with `packed`, best-fit them into seq_len rows with
    per-sequence position_ids (like `bigft.data.packing.pack`)."""
    rows = list(zip(batch["input_ids"], batch["labels"], strict=True))
    if not rows:
        return {"input_ids": [], "labels": [], "position_ids": []} if packed else batch
    order = np.random.default_rng([seed, epoch, indices[0]]).permutation(len(rows))
    rows = [rows[i] for i in order]
    if not packed:
        return {"input_ids": [r[0] for r in rows], "labels": [r[1] for r in rows]}
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "position_ids": []}
    for members in bin_pack([len(ids) for ids, _ in rows], seq_len):
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for m in members:
            ids += rows[m][0]
            labels += rows[m][1]
            positions += range(len(rows[m][0]))
        tail = seq_len - len(ids)
        out["input_ids"].append(ids + [pad_token_id] * tail)
        out["labels"].append(labels + [IGNORE_INDEX] * tail)
        out["position_ids"].append(positions + list(range(tail)))
    return out


def stream_epoch(
    cfg: DataConfig,
    tokenizer: Any,
    seq_len: int,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    packed: bool,
) -> IterableDataset:
    """One epoch of this rank's training rows, streamed."""
    parts = []
    for source in cfg.train_sources:
        raw = stream_source(source.path)
        first = next(iter(raw), None)
        if first is None:
            raise DataError(f"{source.path}: file has no rows")
        parts.append(
            raw.map(
                _encode,
                batched=True,
                with_indices=True,
                remove_columns=list(first),
                fn_kwargs={
                    "formatter": formatter_for(cfg, tokenizer, source),
                    "seq_len": seq_len,
                    "overlong": cfg.overlong,
                    "path": source.path,
                    "min_tokens": cfg.min_tokens,
                    "languages": cfg.languages,
                },
            )
        )
    stream = parts[0] if len(parts) == 1 else _interleave(parts, cfg.train_sources, seed, epoch)
    stream = split_dataset_by_node(stream, rank, world_size)
    return stream.map(
        _window,
        batched=True,
        batch_size=WINDOW,
        with_indices=True,
        fn_kwargs={
            "seed": seed,
            "epoch": epoch,
            "seq_len": seq_len,
            "pad_token_id": tokenizer.pad_token_id,
            "packed": packed,
        },
    )


def _interleave(
    parts: list[IterableDataset], sources: list[TrainSource], seed: int, epoch: int
) -> IterableDataset:
    if any(s.epochs is not None for s in sources):
        raise DataError(
            "data.streaming mixes sources by weight: a streamed source has no known size "
            "to repeat (use weight instead of epochs)"
        )
    weights = [s.weight for s in sources]
    probabilities = None
    if all(w is not None for w in weights):
        total = sum(float(w or 0) for w in weights)
        probabilities = [float(w or 0) / total for w in weights]
    return datasets.interleave_datasets(
        parts,
        probabilities=probabilities,
        seed=seed + epoch,
        stopping_strategy="all_exhausted",
    )


class StreamLoader:
    """Endless micro-batches of a streamed training set for one rank, epoch after epoch.

    `state_dict()` is the epoch and torchdata's loader state (the `datasets` stream's
    position in each worker) after the last batch handed out; it resumes only on the
    same number of processes and loader workers.
    """

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Any,
        seq_len: int,
        seed: int,
        batch_size: int,
        rank: int,
        world_size: int,
        packed: bool,
        collate: Any,
        workers: int = 0,
        pin_memory: bool = False,
        prefetch: int = 2,
    ) -> None:
        self.settings = (cfg, tokenizer, seq_len, seed)
        self.layout = {"world_size": world_size, "workers": workers, "batch_size": batch_size}
        self.rank, self.packed, self.collate = rank, packed, collate
        self.workers, self.pin_memory, self.prefetch = workers, pin_memory, prefetch
        self.epoch = 0
        self.batches_per_epoch = 0  # unknown until an epoch has been read
        self._loader: Any = None
        self._pending: dict[str, Any] | None = None

    @property
    def epoch_progress(self) -> float:
        return float(self.epoch)

    def _epoch_loader(self) -> Any:
        cfg, tokenizer, seq_len, seed = self.settings
        rows = stream_epoch(
            cfg,
            tokenizer,
            seq_len,
            seed,
            self.epoch,
            self.rank,
            self.layout["world_size"],
            self.packed,
        )
        return data_loader(
            rows,
            None,
            self.collate,
            self.workers,
            self.pin_memory,
            self.prefetch,
            batch_size=self.layout["batch_size"],
        )

    def state_dict(self) -> dict[str, Any]:
        state = self._loader.state_dict() if self._loader is not None else self._pending
        return {"epoch": self.epoch, "stream": state, "layout": self.layout}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("layout") != self.layout:
            raise DataError(
                f"the checkpoint's stream position was saved with {state.get('layout')} "
                f"(processes, loader workers, micro-batch); this run has {self.layout}: "
                "resume a streamed run with the same ones"
            )
        self.epoch = int(state["epoch"])
        self._pending = state.get("stream")

    def __iter__(self) -> Iterator[Any]:
        while True:
            self._loader = self._epoch_loader()
            if self._pending is not None:
                self._loader.load_state_dict(self._pending)
                self._pending = None
            produced = 0
            try:
                for batch in self._loader:
                    produced += 1
                    yield batch
            except DataError as exc:
                # Raised in a loader worker, it arrives with the worker's traceback as its
                # message: keep the original one-line message.
                text = str(exc).strip()
                if not text.startswith("Caught DataError"):
                    raise
                last = text.splitlines()[-1]
                raise DataError(last.split("DataError: ", 1)[-1]) from None
            if produced == 0:
                raise DataError("the streamed training data has no rows with targets")
            self.batches_per_epoch = max(self.batches_per_epoch, produced)
            self.epoch += 1
            self._loader = None


def prepare_heldout(cfg: DataConfig, tokenizer: Any, seq_len: int, seed: int) -> PreparedData:
    """The validation and test files of a streamed run, prepared as usual (cleaned,
    tokenized); the train split is empty: it is read as a stream."""
    splits: dict[str, Dataset | None] = {"validation": None, "test": None}
    stats = {"train": SplitStats(source="streamed: " + ", ".join(cfg.train_files))}
    for name in splits:
        path = getattr(cfg, name)
        if not path:
            continue
        whole = SplitConfig(train=1.0, validation=0.0, test=0.0)
        alone = cfg.model_copy(
            update={"train": path, "validation": None, "test": None, "split": whole}
        )
        part = prepare_data(alone, tokenizer, seq_len, seed)
        splits[name] = part.train
        stats[name] = part.stats.splits["train"]
        stats[name].source = path
    empty = Dataset.from_dict(
        {"input_ids": [], "labels": []},
        features=Features({"input_ids": List(Value("int32")), "labels": List(Value("int32"))}),
    )
    return PreparedData(
        empty, splits["validation"], splits["test"], DataStats(seq_len=seq_len, splits=stats)
    )
