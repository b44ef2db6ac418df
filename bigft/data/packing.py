"""Packing and collation.

Packed rows carry per-sequence `position_ids` that restart at 0 and no attention mask.
How transformers isolates the sequences depends on the attention implementation:
sdpa / eager / flex build a block-diagonal mask from position_ids for any batch size
(provided the forward pass runs with `use_cache=False`), while flash-attention takes its
per-sequence (varlen) path only for a batch of ONE row. So for flash-style
implementations the collator flattens a packed micro-batch of B rows into one row of
B x seq_len (`needs_flat_packing`); the loss is a sum over targets, so the shape change
does not change it. The first label of every sequence is -100 (see formats.py), so no
token is ever predicted from another sequence, in either shape.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, Features, List, Value

from bigft.data.formats import IGNORE_INDEX

# The column of a mixture's rows that holds the index of the row's source in data.train;
# batches carry it per token as `source_ids` (-1 on padding) for the per-source loss.
SOURCE = "source_id"
PACKED_COLUMNS = ("input_ids", "labels", "position_ids", "source_ids")


def bin_pack(lengths: Sequence[int] | np.ndarray, seq_len: int) -> list[list[int]]:
    """Best-fit-decreasing: group sequence indices into bins of total length <= seq_len.

    Each sequence, longest first, goes to the open bin it fills most tightly. Open bins are
    kept in one sorted list of `remaining * n + bin_id` keys, so finding the best bin is a
    bisect (O(log n)) and ties break by bin id: the result is deterministic.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return []
    if lengths.max() > seq_len or lengths.min() <= 0:
        raise ValueError(f"every sequence length must be in 1..{seq_len} to be packed")
    n = int(lengths.size)
    order = np.argsort(-lengths, kind="stable").tolist()
    sizes = lengths.tolist()
    smallest = int(lengths.min())
    open_keys: list[int] = []
    bins: list[list[int]] = []
    for i in order:
        size = sizes[i]
        pos = bisect.bisect_left(open_keys, size * n)
        if pos == len(open_keys):
            b, remaining = len(bins), seq_len - size
            bins.append([i])
        else:
            key = open_keys.pop(pos)
            b, remaining = key % n, key // n - size
            bins[b].append(i)
        if remaining >= smallest:  # a bin nothing can fit into is closed for good
            bisect.insort(open_keys, remaining * n + b)
    return bins


def row_lengths(data: Dataset) -> np.ndarray:
    """Tokens in each row of `data` (its `input_ids` lengths), read from the list offsets
    of the underlying Arrow table: nothing is copied, even through a `select` view."""
    column = data.data.column("input_ids")
    chunks = [pc.list_value_length(chunk).to_numpy(zero_copy_only=False) for chunk in column.chunks]
    lengths = np.concatenate(chunks).astype(np.int64) if chunks else np.zeros(0, np.int64)
    indices = data._indices  # a `select` view's mapping onto the table, if any
    if indices is not None:
        lengths = lengths[indices.column(0).to_numpy(zero_copy_only=False)]
    return lengths


@dataclass(frozen=True)
class PackingPlan:
    """`bin_pack`'s bins as arrays: bin k holds rows `members[bounds[k]:bounds[k + 1]]`."""

    members: np.ndarray
    bounds: np.ndarray

    @classmethod
    def of(cls, lengths: Sequence[int] | np.ndarray, seq_len: int) -> PackingPlan:
        bins = bin_pack(lengths, seq_len)
        members = np.fromiter((i for b in bins for i in b), dtype=np.int64)
        bounds = np.zeros(len(bins) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in bins], out=bounds[1:])
        return cls(members, bounds)

    def shuffled(self, seed: int) -> PackingPlan:
        """The same bins in an order drawn from `seed`."""
        order = np.random.default_rng(seed).permutation(len(self.bounds) - 1)
        sizes = np.diff(self.bounds)[order]
        bounds = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(sizes, out=bounds[1:])
        offsets = np.repeat(self.bounds[order] - bounds[:-1], sizes)
        return PackingPlan(self.members[offsets + np.arange(int(bounds[-1]))], bounds)


def pack(
    data: Dataset | Sequence[Mapping[str, Sequence[int]]],
    seq_len: int,
    seed: int,
    pad_token_id: int = 0,
    plan: PackingPlan | None = None,
) -> PackedRows:
    """Pack variable-length rows (`input_ids`, `labels`) into rows of exactly `seq_len`.

    Returns `PackedRows`, whose rows have `input_ids`, `labels` and `position_ids`.
    Sequences are never split; bins come from `bin_pack` and their order is shuffled with
    `seed`. The unused tail of a row is `pad_token_id` with label -100 and its own
    position_ids from 0, so it is a separate (ignored) sequence for attention too. Only
    the plan is held (8 bytes a sequence); rows are assembled from `data` when read.
    `plan`: these rows' bins, made before (`PreparedData.train_plan`).
    """
    if not isinstance(data, Dataset):
        rows = list(data)
        data = Dataset.from_dict(
            {k: [list(r[k]) for r in rows] for k in ("input_ids", "labels")},
            features=Features({k: List(Value("int32")) for k in ("input_ids", "labels")}),
        )
    plan = (plan or PackingPlan.of(row_lengths(data), seq_len)).shuffled(seed)
    return PackedRows(data, plan.members, plan.bounds, seq_len, pad_token_id)


class PackedRows:
    """Rows of `seq_len` tokens made of whole sequences of `data`: packed row k holds
    rows `members[bounds[k]:bounds[k + 1]]` of `data`, in that order, then the tail.

    A map-style dataset (`len`, indexing, `__getitems__` for a loader's batch); rows read
    the sequences from `data` (memory-mapped Arrow) when asked, so packing an epoch costs
    no memory in proportion to its tokens. Rows of a mixture also carry `source_ids`, the
    source of each token (-1 in the tail).
    """

    def __init__(
        self, data: Dataset, members: np.ndarray, bounds: np.ndarray, seq_len: int, pad: int
    ) -> None:
        self.column_names = ["input_ids", "labels", "position_ids"]
        read = ["input_ids", "labels"]
        if SOURCE in data.column_names:
            read.append(SOURCE)
            self.column_names.append("source_ids")
        self.data = data.with_format("arrow", columns=read)
        self.members = members
        self.bounds = bounds
        self.seq_len = seq_len
        self.pad_token_id = pad

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitems__(self, keys: Sequence[int]) -> list[dict[str, list[int]]]:
        keys = [int(k) for k in keys]
        if any(not 0 <= k < len(self) for k in keys):
            raise IndexError(f"packed row index out of range 0..{len(self) - 1}")
        counts = [int(self.bounds[k + 1] - self.bounds[k]) for k in keys]
        picked = np.concatenate([self.members[self.bounds[k] : self.bounds[k + 1]] for k in keys])
        table = self.data[picked.tolist()]
        ids, lengths = _values(table.column("input_ids"))
        labels, _ = _values(table.column("labels"))
        sources = table.column(SOURCE).to_numpy() if SOURCE in table.column_names else None
        out, seq, start = [], 0, 0
        for count in counts:
            sizes = lengths[seq : seq + count]
            used = int(sizes.sum())
            row_ids = np.full(self.seq_len, self.pad_token_id, dtype=np.int64)
            row_labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
            row_ids[:used] = ids[start : start + used]
            row_labels[:used] = labels[start : start + used]
            firsts = np.repeat(np.cumsum(sizes) - sizes, sizes)
            positions = np.concatenate([np.arange(used) - firsts, np.arange(self.seq_len - used)])
            row = {
                "input_ids": row_ids.tolist(),
                "labels": row_labels.tolist(),
                "position_ids": positions.tolist(),
            }
            if sources is not None:
                row_sources = np.full(self.seq_len, -1, dtype=np.int64)
                row_sources[:used] = np.repeat(sources[seq : seq + count], sizes)
                row["source_ids"] = row_sources.tolist()
            out.append(row)
            seq, start = seq + count, start + used
        return out

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            rows = self.__getitems__(range(len(self))[key])
            return {name: [r[name] for r in rows] for name in self.column_names}
        return self.__getitems__([key if key >= 0 else len(self) + key])[0]

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        for start in range(0, len(self), 64):
            yield from self.__getitems__(range(start, min(start + 64, len(self))))

    def to_dict(self) -> dict[str, list[list[int]]]:
        return self[:]


def _values(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, per-row lengths) of a list column."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False).astype(np.int64)
    return array.flatten().to_numpy(zero_copy_only=False), lengths


def packing_efficiency(lengths: Sequence[int] | np.ndarray, seq_len: int) -> float:
    """Real tokens / (packed rows x seq_len) that `pack` achieves on these lengths."""
    lengths = np.asarray(lengths, dtype=np.int64)
    rows = len(bin_pack(lengths, seq_len))
    return float(lengths.sum()) / (rows * seq_len) if rows else 0.0


# Attention implementations that isolate packed sequences with a mask built from
# position_ids, whatever the batch size. Every other one (flash_attention_2/3 and the hub
# kernels' flash variants) recognises a packed batch only when it is a single row.
MASKED_ATTENTION = ("sdpa", "eager", "flex_attention")


def needs_flat_packing(attn_implementation: str | None) -> bool:
    """Whether packed micro-batches must be handed to the model as one row."""
    return (attn_implementation or "eager") not in MASKED_ATTENTION


class Collator:
    """list of rows -> dict of torch.long tensors.

    packed=True: rows already have equal length; stack input_ids, labels, position_ids (no
    attention_mask: isolation comes from position_ids); with `flatten` the B rows become
    one row of B x seq_len (see the module docstring). packed=False: right-pad to the
    longest row in the batch, labels with -100, attention_mask 1 for real tokens. Rows of
    a mixture add `source_ids`, each token's source (-1 on padding).
    """

    def __init__(self, pad_token_id: int, packed: bool, flatten: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.packed = packed
        self.flatten = flatten

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if self.packed:
            keys = [k for k in PACKED_COLUMNS if k in rows[0]]
            batch = {k: torch.tensor([list(r[k]) for r in rows], dtype=torch.long) for k in keys}
            return {k: v.reshape(1, -1) for k, v in batch.items()} if self.flatten else batch
        width = max(len(r["input_ids"]) for r in rows)
        batch = {
            "input_ids": torch.full((len(rows), width), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        }
        if SOURCE in rows[0]:
            batch["source_ids"] = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            batch["input_ids"][i, :n] = torch.as_tensor(list(row["input_ids"]))
            batch["labels"][i, :n] = torch.as_tensor(list(row["labels"]))
            batch["attention_mask"][i, :n] = 1
            if "source_ids" in batch:
                batch["source_ids"][i, :n] = int(row[SOURCE])
        return batch
