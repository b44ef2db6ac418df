"""From data config to tokenized, cleaned, split datasets, with statistics.

Order: load (every train file) -> format + tokenize (`datasets.map`, cached) -> stop at the
first invalid row -> deterministic split by ratios (splits with their own file are not
taken from train) -> augment the train split's texts (data.augment.text,
`bigft.data.augment_rows`) -> clean each split (empty, duplicate, over-long; optionally too
short, another language, near-duplicate: `bigft.data.clean`) -> statistics.
Everything a user can get wrong in the data is found here, before any run directory,
model or GPU is touched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, Features, List, Value, concatenate_datasets

from bigft import __version__
from bigft.config import DataConfig, TrainSource
from bigft.data.augment_rows import RowTexts, augment_split
from bigft.data.augment_text import TextAugmenter
from bigft.data.clean import NearDuplicates, Screen, language_detector
from bigft.data.dedup import ExactDuplicates
from bigft.data.formats import IGNORE_INDEX, FormatSpec, Formatter
from bigft.data.mixture import SOURCE
from bigft.data.packing import PackingPlan, row_lengths
from bigft.data.sources import load_rows, row_location
from bigft.errors import ConfigError, DataError, RowError

SPLITS = ("train", "validation", "test")
DROP_REASONS = ("empty", "duplicate", "too_long", "too_short", "language", "near_duplicate")

_FEATURES = Features(
    {
        "input_ids": List(Value("int32")),
        "labels": List(Value("int32")),
        "error": Value("string"),
        "length": Value("int32"),  # before truncation
        "targets": Value("int32"),  # target tokens before truncation
        "kept_targets": Value("int32"),  # target tokens after truncation
        "digest": Value("binary"),  # 16 bytes of ids + labels, for exact duplicates
        "source": Value("string"),  # the file, and
        "row": Value("int64"),  # the row's index in it, for the removal report
    }
)
_BOOKKEEPING = ["length", "targets", "kept_targets", "digest", "source", "row"]


@dataclass
class SplitStats:
    """What happened to the rows of one split."""

    source: str
    rows_loaded: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    truncated: int = 0
    length_p50: int = 0
    length_p90: int = 0
    length_p99: int = 0
    length_max: int = 0
    tokens: int = 0
    target_tokens: int = 0
    # reason -> up to two dropped rows: location, detail, text (bigft.data.clean.Screen)
    removed: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # rows added by data.augment.text (counted in rows_loaded, then cleaned like any row),
    # and a few of them with their originals (bigft.data.augment_rows.AugmentReport)
    augmented: int = 0
    augmented_examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class DataStats:
    """Per-split statistics, plus the packing efficiency of the train split."""

    seq_len: int
    splits: dict[str, SplitStats]
    packing_efficiency: float | None = None
    packed_rows: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PreparedData:
    """Tokenized, cleaned, unpacked splits: columns `input_ids` and `labels`, one example
    per row. Packing (if any) happens later, per epoch plan, with `pack`."""

    train: Dataset
    validation: Dataset | None
    test: Dataset | None
    stats: DataStats
    train_plan: PackingPlan | None = None  # the train rows' bins, with data.packing


def prepare_data(cfg: DataConfig, tokenizer: Any, seq_len: int, seed: int) -> PreparedData:
    """Load, tokenize, validate, split and clean the data described by `cfg`.

    Splits with their own file (data.validation / data.test) take nothing from train:
    their ratio stays with train, and only the others are split off, by `seed`.

    Raises DataError (one line, naming file and line) for any problem in the data, and
    when no training row survives cleaning.
    """
    near = NearDuplicates(cfg.near_duplicates) if cfg.near_duplicates is not None else None
    if cfg.languages is not None:
        language_detector()  # the optional package is there
    augment = cfg.augment.text
    if augment is not None and cfg.streaming:  # here "train" is a held-out file
        raise ConfigError("data.augment.text: not with data.streaming")
    augmenter = TextAugmenter(augment, seed) if augment is not None else None  # fails early
    tokenize = _Tokenize(
        formatter_for(cfg, tokenizer), seq_len, cfg.overlong == "truncate", cfg.num_proc, cfg.cache
    )
    train_sources = cfg.train_sources

    def load_train() -> Dataset:
        """The train files, each with its own format; a `source_id` column (the
        source's index in data.train) when there are several."""
        parts = []
        for index, source in enumerate(train_sources):
            rows = tokenize.file(source.path, formatter_for(cfg, tokenizer, source))
            if len(train_sources) > 1:
                rows = rows.add_column(SOURCE, np.full(len(rows), index, dtype=np.int32))
            parts.append(rows)
        return parts[0] if len(parts) == 1 else concatenate_datasets(parts)

    parts, sources = assemble_splits(cfg, tokenize.files, seed, load_train)
    report = None
    if augmenter is not None:  # after the split: held-out rows are never augmented

        def texts_of(i: int) -> RowTexts:
            s = train_sources[i]
            return RowTexts.of_format(s.format or cfg.format, s.text_field or cfg.text_field)

        def encode(raw: Dataset, i: int) -> Dataset:
            s = train_sources[i]
            return tokenize.rows(raw, s.path + " (augmented)", formatter_for(cfg, tokenizer, s))

        paths = [s.path for s in train_sources]
        parts["train"], report = augment_split(parts["train"], paths, texts_of, augmenter, encode)

    # Clean in a fixed order sharing one set of digests: a row duplicated across splits is
    # dropped from validation/test, never from train, so evaluation never sees train rows.
    # The near-duplicate index (made before anything is read, so that a missing package
    # is said at once) is shared the same way, over the splits in that order.
    seen = ExactDuplicates([parts[name] for name in SPLITS if name in parts])
    cleaned: dict[str, Dataset | None] = {}
    stats: dict[str, SplitStats] = {}
    for name in SPLITS:
        if name not in parts:
            continue
        cleaned[name], stats[name] = _clean(
            parts[name], sources[name], seen, near, seq_len, cfg, tokenizer
        )
        seen.next_split()
    if report is not None:
        stats["train"].augmented = report.added
        stats["train"].augmented_examples = report.examples
    train = cleaned["train"]
    if train is None:
        s = stats["train"]
        raise DataError(
            f"{sources['train']}: no training rows left ({s.rows_loaded} loaded; dropped "
            + ", ".join(f"{k} {v}" for k, v in s.dropped.items())
            + "); check data.format, data.overlong and train.seq_len (and data.min_tokens, "
            "data.languages, data.near_duplicates if set)"
        )
    data_stats = DataStats(seq_len=seq_len, splits=stats)
    plan = None
    if cfg.packing:
        lengths = row_lengths(train)
        plan = PackingPlan.of(lengths, seq_len)
        data_stats.packed_rows = len(plan.bounds) - 1
        data_stats.packing_efficiency = float(lengths.sum()) / (data_stats.packed_rows * seq_len)
    validation, test = cleaned.get("validation"), cleaned.get("test")
    return PreparedData(train, validation, test, data_stats, plan)


def assemble_splits(
    cfg: DataConfig,
    load: Callable[[list[str]], Dataset],
    seed: int,
    load_train: Callable[[], Dataset] | None = None,
) -> tuple[dict[str, Dataset], dict[str, str]]:
    """(split -> rows, split -> where they came from), rows made by `load(paths)` (the
    train files by `load_train()` when given).

    Splits with their own file (data.validation / data.test) take nothing from train:
    their ratio stays with train, and only the others are split off, by `seed`.
    """
    pool = load_train() if load_train else load(cfg.train_files)
    parts: dict[str, Dataset] = {}
    sources = {"train": ", ".join(cfg.train_files)}
    for name, path in (("validation", cfg.validation), ("test", cfg.test)):
        if path:
            parts[name] = load([path])
            sources[name] = path
    ratios = {n: getattr(cfg.split, n) for n in ("validation", "test") if n not in parts}
    for name, indices in split_indices(len(pool), ratios, seed).items():
        if name == "train" or len(indices):
            parts[name] = pool.select(indices)
            sources.setdefault(name, f"{ratios.get(name, 0):.0%} of train")
    return parts, sources


def split_indices(n: int, ratios: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Deterministic split of range(n): `ratios` gives the held-out splits' fractions; the
    rest is train. Indices are returned sorted (order is the loader's job)."""
    counts = {name: round(n * r) for name, r in ratios.items()}
    for name, r in ratios.items():
        if r > 0 and counts[name] == 0 and n >= 2:
            counts[name] = 1  # a requested split is never silently empty on small data
    while sum(counts.values()) >= n and any(counts.values()):
        largest = max(counts, key=lambda k: counts[k])
        counts[largest] -= 1  # train keeps at least one row
    perm = np.random.default_rng(seed).permutation(n)
    out: dict[str, np.ndarray] = {}
    start = 0
    for name, count in counts.items():
        out[name] = np.sort(perm[start : start + count])
        start += count
    out["train"] = np.sort(perm[start:])
    return out


def formatter_for(cfg: DataConfig, tokenizer: Any, source: TrainSource | None = None) -> Formatter:
    """The formatter of data.train's `source` (its own format and text field, if it has
    them), or of data's defaults."""
    spec = FormatSpec(
        format=(source and source.format) or cfg.format,
        text_field=(source and source.text_field) or cfg.text_field,
        prompt_template=cfg.prompt_template,
        chat_template=cfg.chat_template,
        completion_only=cfg.completion_only,
    )
    return Formatter(spec, tokenizer)


class _Tokenize:
    """Format + tokenize files with `datasets.map`, then fail on the first bad row."""

    def __init__(
        self, formatter: Formatter, seq_len: int, truncate: bool, num_proc: int, cache: bool
    ) -> None:
        self.fn_kwargs = {
            "formatter": formatter,
            "seq_len": seq_len,
            "truncate": truncate,
            # datasets fingerprints the Formatter's state but not its class's code: the
            # version makes a bigft upgrade re-tokenize instead of reusing a stale cache.
            "code_version": __version__,
        }
        self.num_proc = num_proc
        self.cache = cache

    def files(self, paths: list[str]) -> Dataset:
        parts = [self.file(path) for path in paths]
        return parts[0] if len(parts) == 1 else concatenate_datasets(parts)

    def file(self, path: str, formatter: Formatter | None = None) -> Dataset:
        return self.rows(load_rows(path), path, formatter)

    def rows(self, raw: Dataset, path: str, formatter: Formatter | None = None) -> Dataset:
        """Tokenize `raw`, the rows of `path`; a DataError names the first bad row."""
        num_proc = min(self.num_proc, len(raw))
        fn_kwargs = (
            self.fn_kwargs if formatter is None else {**self.fn_kwargs, "formatter": formatter}
        )
        out = raw.map(
            tokenize_batch,
            batched=True,
            with_indices=True,  # and the path: rows' locations for the removal report
            fn_kwargs={**fn_kwargs, "path": path},
            remove_columns=raw.column_names,
            features=_FEATURES,
            num_proc=num_proc if num_proc > 1 else None,
            load_from_cache_file=self.cache,
            # Without the cache, nothing is written next to it either.
            keep_in_memory=not self.cache,
            desc=f"tokenizing {path}",
        )
        errors = out.with_format("arrow")["error"]
        first = pc.index(pc.not_equal(errors, ""), True).as_py()
        if first >= 0:
            raise DataError(f"{row_location(path, first)}: {errors[first].as_py()}")
        return out.remove_columns("error")


def tokenize_batch(
    batch: dict[str, list[Any]],
    indices: list[int],
    formatter: Formatter,
    seq_len: int,
    truncate: bool,
    code_version: str = "",
    path: str = "",
) -> dict[str, list[Any]]:
    """`datasets.map` function (`with_indices`: `indices` are the rows' indices in `path`).
    Bad rows come back as an `error` string rather than an exception, so the pipeline can
    name the first one by file and line."""
    out: dict[str, list[Any]] = {name: [] for name in _FEATURES}
    size = len(next(iter(batch.values()))) if batch else 0
    for i in range(size):
        row = {key: values[i] for key, values in batch.items()}
        try:
            ids, labels = formatter(row)
            error = ""
        except RowError as exc:
            ids, labels, error = [], [], str(exc)
        length = len(ids)
        targets = sum(1 for label in labels if label != IGNORE_INDEX)
        if truncate and length > seq_len:
            ids, labels = ids[:seq_len], labels[:seq_len]
        digest = hashlib.blake2b(
            np.asarray(ids, dtype=np.int32).tobytes() + np.asarray(labels, np.int32).tobytes(),
            digest_size=16,
        ).digest()
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["error"].append(error)
        out["length"].append(length)
        out["targets"].append(targets)
        out["kept_targets"].append(sum(1 for label in labels if label != IGNORE_INDEX))
        out["digest"].append(digest)
        out["source"].append(path)
        out["row"].append(indices[i])
    return out


def _clean(
    ds: Dataset,
    source: str,
    seen: ExactDuplicates,
    near: NearDuplicates | None,
    seq_len: int,
    cfg: DataConfig,
    tokenizer: Any,
) -> tuple[Dataset | None, SplitStats]:
    """Drop empty, duplicate, over-long and too short rows, then (`bigft.data.clean`) rows
    in another language and near-duplicates of kept rows; count what was dropped and
    truncated, with a few examples of each reason."""
    stats = SplitStats(source=source, rows_loaded=len(ds))
    cols = ds.select_columns(_BOOKKEEPING[:3]).with_format("numpy")[:]
    # Truncation that cuts away every target (a prompt longer than seq_len) is as useless
    # as a dropped row.
    too_long = (cols["length"] > seq_len) & ((cfg.overlong == "drop") | (cols["kept_targets"] == 0))
    too_short = cols["length"] < cfg.min_tokens
    candidates = (cols["targets"] > 0) & ~too_long & ~too_short
    screen = Screen(ds, near, cfg, tokenizer, seq_len, candidates)
    kept_mask = np.zeros(len(ds), dtype=bool)
    for i, targets in enumerate(cols["targets"].tolist()):
        reason: str | None
        if targets == 0:
            reason = "empty"
        elif cfg.drop_duplicates and i in seen:
            reason = "duplicate"
        elif too_long[i]:
            reason = "too_long"
        elif too_short[i]:
            reason = "too_short"
        else:
            reason = screen.verdict(i)
        if reason is None:
            kept_mask[i] = True
            seen.add(i)
            screen.keep(i)
            stats.truncated += int(cols["length"][i] > seq_len)
            continue
        stats.dropped[reason] += 1
        screen.example(stats.removed, reason, i)
    kept = np.flatnonzero(kept_mask)
    stats.rows_kept = len(kept)
    if not len(kept):
        return None, stats
    lengths = np.minimum(cols["length"][kept], seq_len)
    stats.length_p50, stats.length_p90, stats.length_p99 = (
        int(np.percentile(lengths, q, method="nearest")) for q in (50, 90, 99)
    )
    stats.length_max = int(lengths.max())
    stats.tokens = int(lengths.sum())
    stats.target_tokens = int(cols["kept_targets"][kept].sum())
    return ds.select(kept).remove_columns(_BOOKKEEPING), stats
