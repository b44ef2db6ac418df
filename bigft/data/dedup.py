"""Exact-duplicate removal by a 16-byte digest of each row's ids and labels."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
from datasets import Dataset


class ExactDuplicates:
    """The digests of kept rows, over the splits in cleaning order, for exact-duplicate
    removal. Only digests that occur more than once anywhere can be seen twice, so only
    those are remembered: memory follows the duplicates, not the rows (16 bytes a row
    while the splits are cleaned)."""

    def __init__(self, splits: list[Dataset]) -> None:
        keys = [_digests(split) for split in splits]
        if keys and sum(len(k) for k in keys):
            _, inverse, counts = np.unique(
                np.concatenate(keys), return_inverse=True, return_counts=True
            )
            repeated = counts[inverse] > 1
        else:
            repeated = np.zeros(0, dtype=bool)
        bounds = np.cumsum([0, *(len(k) for k in keys)])
        self._keys = keys
        self._repeated = [repeated[a:b] for a, b in itertools.pairwise(bounds)]
        self._split = 0
        self._kept: set[bytes] = set()

    def next_split(self) -> None:
        self._split += 1

    def __contains__(self, i: int) -> bool:
        """Whether row `i` of the current split equals a row kept before it."""
        return bool(self._repeated[self._split][i]) and (
            self._keys[self._split][i].tobytes() in self._kept
        )

    def add(self, i: int) -> None:
        """Row `i` of the current split is kept."""
        if self._repeated[self._split][i]:
            self._kept.add(self._keys[self._split][i].tobytes())


def _digests(ds: Dataset) -> np.ndarray:
    """The `digest` column as a (rows,) array of 16-byte values."""
    column = ds.with_format("arrow")["digest"]
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    fixed = array.cast(pa.binary(16))
    return np.frombuffer(fixed.buffers()[1], dtype="V16")[fixed.offset : fixed.offset + len(fixed)]
