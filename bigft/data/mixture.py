"""Training mixtures: how many rows of each source of data.train make up an epoch.

A prepared train split made of several sources has a `source_id` column (the index of the
row's source in data.train). With weights, an epoch holds as many rows as all sources
together and source i contributes weight_i / sum(weights) of them; with epoch counts,
source i contributes epochs_i x its rows. A source asked for more rows than it has
repeats all of them as often as fits and draws the rest without replacement; one asked
for fewer draws without replacement. Draws are seeded by train.seed, so every process
and every resume builds the same epoch. The loader then shuffles the epoch as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from datasets import Dataset

from bigft.config import TrainSource
from bigft.data.packing import SOURCE, row_lengths

__all__ = ["SOURCE", "SourceShare", "mix", "sources_of"]


@dataclass
class SourceShare:
    """One source's part of the training data, before and after mixing."""

    name: str
    rows: int  # training rows kept after cleaning
    tokens: int
    epoch_rows: int  # rows in each epoch
    epoch_tokens: int


def sources_of(train: Dataset) -> np.ndarray:
    """The source index of every training row (all 0 without a `source_id` column)."""
    if SOURCE not in train.column_names:
        return np.zeros(len(train), dtype=np.int64)
    return np.asarray(train.with_format("numpy")[SOURCE], dtype=np.int64)


def epoch_counts(available: list[int], sources: list[TrainSource]) -> list[int]:
    """Rows each source contributes to an epoch, given the rows it has."""
    if all(s.weight is not None for s in sources):
        total = sum(available)
        weight_sum = sum(float(s.weight or 0) for s in sources)
        counts = [round(total * float(s.weight or 0) / weight_sum) for s in sources]
        # A source with rows and a weight is never mixed away by rounding.
        return [max(c, 1) if n else 0 for c, n in zip(counts, available, strict=True)]
    return [
        round(n * (s.epochs if s.epochs is not None else 1.0))
        for n, s in zip(available, sources, strict=True)
    ]


def mixture_indices(source_of_row: np.ndarray, sources: list[TrainSource], seed: int) -> np.ndarray:
    """Row indices of one training epoch (repeats allowed), source by source."""
    rng = np.random.default_rng([seed, 0x6D6978])  # "mix"
    members = [np.flatnonzero(source_of_row == i) for i in range(len(sources))]
    counts = epoch_counts([len(m) for m in members], sources)
    picked = []
    for rows, count in zip(members, counts, strict=True):
        if not len(rows) or not count:
            continue
        repeats, rest = divmod(count, len(rows))
        picked += [rows] * repeats
        if rest:
            picked.append(np.sort(rng.choice(rows, size=rest, replace=False)))
    return np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)


def mix(train: Dataset, sources: list[TrainSource], seed: int) -> tuple[Dataset, list[SourceShare]]:
    """The training epoch's rows for data.train's `sources`, and each source's share."""
    source_of_row = sources_of(train)
    lengths = row_lengths(train)
    indices = mixture_indices(source_of_row, sources, seed)
    shares = []
    for i, source in enumerate(sources):
        mine = source_of_row == i
        in_epoch = source_of_row[indices] == i
        shares.append(
            SourceShare(
                name=source.label,
                rows=int(mine.sum()),
                tokens=int(lengths[mine].sum()),
                epoch_rows=int(in_epoch.sum()),
                epoch_tokens=int(lengths[indices][in_epoch].sum()),
            )
        )
    identity = len(indices) == len(train) and bool(np.all(indices == np.arange(len(train))))
    return (train if identity else train.select(indices)), shares
