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
import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset

from bigft.data.formats import IGNORE_INDEX


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


def _flat(
    data: Dataset | Sequence[Mapping[str, Sequence[int]]], column: str
) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, per-row lengths) of a list column, without a Python loop per token."""
    if isinstance(data, Dataset):
        array = data.with_format("arrow")[column]
        array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        return array.flatten().to_numpy(zero_copy_only=False), lengths.astype(np.int64)
    rows = [np.asarray(row[column], dtype=np.int64) for row in data]
    lengths = np.asarray([len(r) for r in rows], dtype=np.int64)
    flat = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return flat, lengths


def pack(
    data: Dataset | Sequence[Mapping[str, Sequence[int]]],
    seq_len: int,
    seed: int,
    pad_token_id: int = 0,
) -> Dataset:
    """Pack variable-length rows (`input_ids`, `labels`) into rows of exactly `seq_len`.

    Returns a Dataset with `input_ids`, `labels` and `position_ids`. Sequences are never
    split; bins come from `bin_pack` and their order is shuffled with `seed`. The unused
    tail of a row is `pad_token_id` with label -100 and its own position_ids from 0, so it
    is a separate (ignored) sequence for attention too.
    """
    ids, lengths = _flat(data, "input_ids")
    labels, label_lengths = _flat(data, "labels")
    if not np.array_equal(lengths, label_lengths):
        raise ValueError("input_ids and labels differ in length in some row")
    bins = bin_pack(lengths, seq_len)
    bins = [bins[b] for b in np.random.default_rng(seed).permutation(len(bins))]
    order = np.asarray([i for members in bins for i in members], dtype=np.int64)
    bin_of = np.repeat(np.arange(len(bins)), [len(members) for members in bins])

    seq_lengths = lengths[order]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])[order]  # in the flat input
    # Offset of each sequence inside its packed row: the running sum of lengths minus the
    # running sum at the first sequence of its bin.
    cstart = np.cumsum(seq_lengths) - seq_lengths
    bin_first = np.searchsorted(bin_of, np.arange(len(bins)))  # bin_of is sorted
    row_start = cstart - cstart[bin_first][bin_of]
    within = np.arange(int(seq_lengths.sum())) - np.repeat(cstart, seq_lengths)
    source = np.repeat(starts, seq_lengths) + within
    target = np.repeat(bin_of * seq_len + row_start, seq_lengths) + within

    out_ids = np.full(len(bins) * seq_len, pad_token_id, dtype=np.int32)
    out_labels = np.full(len(bins) * seq_len, IGNORE_INDEX, dtype=np.int32)
    column = np.tile(np.arange(seq_len), len(bins))
    used = np.zeros(len(bins), dtype=np.int64)
    np.add.at(used, bin_of, seq_lengths)
    out_pos = (column - np.repeat(used, seq_len)).astype(np.int32)  # the tail restarts at 0
    out_ids[target] = ids[source]
    out_labels[target] = labels[source]
    out_pos[target] = within

    def rows(values: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(values, type=pa.int32()), seq_len)

    table = pa.table(
        {"input_ids": rows(out_ids), "labels": rows(out_labels), "position_ids": rows(out_pos)}
    )
    # datasets would otherwise hash the whole table for its fingerprint (slow); the inputs
    # and settings determine the output, so hash those.
    digest = hashlib.blake2b(digest_size=16)
    for part in (ids, labels, lengths, np.asarray([seq_len, seed, pad_token_id])):
        digest.update(np.ascontiguousarray(part).tobytes())
    return Dataset(table, fingerprint=digest.hexdigest())


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
    longest row in the batch, labels with -100, attention_mask 1 for real tokens.
    """

    def __init__(self, pad_token_id: int, packed: bool, flatten: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.packed = packed
        self.flatten = flatten

    def __call__(self, rows: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        if self.packed:
            keys = ("input_ids", "labels", "position_ids")
            batch = {k: torch.tensor([list(r[k]) for r in rows], dtype=torch.long) for k in keys}
            return {k: v.reshape(1, -1) for k, v in batch.items()} if self.flatten else batch
        width = max(len(r["input_ids"]) for r in rows)
        batch = {
            "input_ids": torch.full((len(rows), width), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        }
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            batch["input_ids"][i, :n] = torch.as_tensor(list(row["input_ids"]))
            batch["labels"][i, :n] = torch.as_tensor(list(row["labels"]))
            batch["attention_mask"][i, :n] = 1
        return batch
