"""Packing isolates sequences, wastes little, loses nothing; collation; sharded loader."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset

from bigft.data import Collator, TrainLoader, data_loader, eval_batches, pack
from bigft.data.formats import IGNORE_INDEX
from bigft.data.packing import bin_pack
from bigft.tiny import build_tiny_llama

PAD = 0


def random_rows(lengths: list[int], seed: int = 0) -> list[dict[str, list[int]]]:
    """Rows of random non-pad tokens; labels = ids except position 0, like formats.py."""
    rng = np.random.default_rng(seed)
    rows = []
    for length in lengths:
        ids = rng.integers(4, 100, size=length).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX, *ids[1:]]})
    return rows


def segments(row: dict[str, list[int]]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Split a packed row at position_ids resets into (ids, labels) segments."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return [
        (tuple(row["input_ids"][a:b]), tuple(row["labels"][a:b]))
        for a, b in itertools.pairwise(starts)
    ]


def is_tail(segment: tuple[tuple[int, ...], tuple[int, ...]]) -> bool:
    ids, labels = segment
    return set(ids) == {PAD} and set(labels) == {IGNORE_INDEX}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_sequences_get_the_same_logits_as_alone(attn: str) -> None:
    rows = random_rows([7, 13, 21])
    packed = pack(rows, seq_len=48, seed=0, pad_token_id=PAD)
    assert len(packed) == 1  # all three (41 tokens) in one row, with a 7-token tail
    row = packed[0]

    model = build_tiny_llama(vocab_size=100, seed=0)
    model.set_attn_implementation(attn)
    model.eval()
    with torch.no_grad():
        input_ids = torch.tensor([row["input_ids"]])
        position_ids = torch.tensor([row["position_ids"]])
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        naive = model(input_ids=input_ids, use_cache=False).logits  # no position_ids
        start, checked = 0, 0
        for part in segments(row):
            end = start + len(part[0])
            if not is_tail(part):
                alone = model(input_ids=torch.tensor([part[0]]), use_cache=False).logits
                torch.testing.assert_close(logits[:, start:end], alone, atol=1e-5, rtol=0)
                checked += 1
                if start > 0:  # the check can fail: without position_ids, sequences mix
                    assert (naive[:, start:end] - alone).abs().max() > 1e-3
            start = end
    assert checked == 3 and start == 48


def test_packing_preserves_every_sequence_and_fills_rows() -> None:
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(4.5, 0.9, size=600).astype(int), 2, 512).tolist()
    rows = random_rows(lengths, seed=1)
    packed = pack(Dataset.from_list(rows), seq_len=512, seed=3, pad_token_id=PAD)

    assert set(packed.column_names) == {"input_ids", "labels", "position_ids"}
    found: Counter[tuple[tuple[int, ...], tuple[int, ...]]] = Counter()
    for row in packed:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == 512
        parts = segments(row)
        for i, part in enumerate(parts):
            if is_tail(part):
                assert i == len(parts) - 1  # padding only at the end of a row
            else:
                found[part] += 1
    expected = Counter((tuple(r["input_ids"]), tuple(r["labels"])) for r in rows)
    assert found == expected  # nothing split, lost or duplicated

    efficiency = sum(lengths) / (len(packed) * 512)
    assert efficiency > 0.9, efficiency


def test_pack_is_deterministic_and_seed_only_reorders_rows() -> None:
    rows = random_rows([5, 9, 3, 12, 7, 8, 15, 4] * 4, seed=2)
    a = pack(rows, 24, seed=0).to_dict()
    b = pack(rows, 24, seed=0).to_dict()
    c = pack(rows, 24, seed=1).to_dict()
    assert a == b
    assert a != c
    # A Dataset view (select keeps an indices mapping, as prepare_data returns) packs the
    # same as the plain rows it shows.
    view = Dataset.from_list(list(reversed(rows)) + rows).select(range(len(rows), 2 * len(rows)))
    assert pack(view, 24, seed=0).to_dict() == a
    assert sorted(map(tuple, a["input_ids"])) == sorted(map(tuple, c["input_ids"]))


def test_bin_packing_is_fast_on_100k_rows() -> None:
    lengths = np.clip(np.random.default_rng(0).lognormal(5, 0.8, 100_000), 1, 2048).astype(int)
    start = time.perf_counter()
    bins = bin_pack(lengths, 2048)
    assert time.perf_counter() - start < 3.0
    assert sorted(i for b in bins for i in b) == list(range(100_000))
    assert all(lengths[b].sum() <= 2048 for b in bins)
    assert lengths.sum() / (len(bins) * 2048) > 0.99
    with pytest.raises(ValueError, match=r"1\.\.2048"):
        bin_pack([2049], 2048)


def test_collator_padded_and_packed() -> None:
    rows = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8, 9, 10, 11, 12], "labels": [-100, -100, 10, 11, 12]},
    ]
    batch = Collator(pad_token_id=PAD, packed=False)(rows)
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]

    packed = pack(rows, seq_len=10, seed=0)
    batch = Collator(pad_token_id=PAD, packed=True)(list(packed))
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["position_ids"].shape == (1, 10) and batch["position_ids"].dtype == torch.long


def ids(rows: list[dict[str, Any]]) -> list[int]:
    return [row["i"] for row in rows]


def take(iterator: Any, n: int) -> list[Any]:
    return [next(iterator) for _ in range(n)]


def flat(batches: Any) -> list[int]:
    return list(itertools.chain.from_iterable(batches))


@pytest.mark.parametrize("as_dataset", [False, True])
def test_loader_shards_are_disjoint_and_cover_each_epoch(as_dataset: bool) -> None:
    data: Any = [{"i": i} for i in range(23)]
    if as_dataset:
        data = Dataset.from_list(data)
    loaders = [TrainLoader(data, 3, r, 2, seed=7, shuffle=True, collate=ids) for r in (0, 1)]
    assert loaders[0].batches_per_epoch == 3  # 23 // (3 x 2), last partial batch dropped
    streams = [iter(loader) for loader in loaders]
    for epoch in range(3):
        seen = [flat(take(stream, 3)) for stream in streams]
        assert not set(seen[0]) & set(seen[1])
        order = loaders[0].order(epoch).tolist()
        assert sorted(seen[0] + seen[1]) == sorted(order[:18])
    assert loaders[0].order(0).tolist() != loaders[0].order(1).tolist()
    plain = TrainLoader(data, 3, 0, 2, seed=7, shuffle=False, collate=ids)
    assert next(iter(plain)) == [0, 1, 2]


def test_loader_resumes_with_the_exact_next_batch() -> None:
    data = [{"i": i} for i in range(23)]
    first = TrainLoader(data, 2, 1, 2, seed=3, shuffle=True, collate=ids)
    stream = iter(first)
    take(stream, 7)  # crosses an epoch boundary (5 batches per epoch)
    state = first.state_dict()
    assert state == {"epoch": 1, "position": 8}  # 2 global batches of 2 x 2 rows
    expected = take(stream, 6)

    resumed = TrainLoader(data, 2, 1, 2, seed=3, shuffle=True, collate=ids)
    resumed.load_state_dict(state)
    assert take(iter(resumed), 6) == expected


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 4)])
def test_loader_resumes_at_the_same_row_on_another_world_size(before: int, after: int) -> None:
    """The position is saved in rows: a resumed loader on a different number of processes
    neither replays nor skips a row, even across an epoch boundary."""
    data = [{"i": i} for i in range(40)]
    micro = 2

    def loaders(world: int) -> list[TrainLoader]:
        return [
            TrainLoader(data, micro, r, world, seed=5, shuffle=True, collate=ids)
            for r in range(world)
        ]

    def rows_of_steps(group: list[TrainLoader], steps: int, rows_per_step: int) -> list[int]:
        streams = [iter(loader) for loader in group]
        seen: list[int] = []
        while len(seen) < steps * rows_per_step:
            for stream in streams:
                seen += next(stream)
        return seen

    per_step = 8  # global batch of every step, in rows: the accumulation adapts to the world
    reference = rows_of_steps(loaders(1), 9, per_step)  # 9 steps = 72 rows, into epoch 1

    first = loaders(before)
    seen = rows_of_steps(first, 3, per_step)
    state = first[0].state_dict()
    assert state == {"epoch": 0, "position": 24}
    second = loaders(after)
    for loader in second:
        loader.load_state_dict(state)
    seen += rows_of_steps(second, 6, per_step)
    for step in range(9):  # each step sees the same rows as the uninterrupted run
        window = slice(step * per_step, (step + 1) * per_step)
        assert sorted(seen[window]) == sorted(reference[window]), step


def test_loader_reads_batch_counted_state() -> None:
    """Checkpoints written before positions were kept in rows resume where they were."""
    data = [{"i": i} for i in range(23)]
    loader = TrainLoader(data, 2, 0, 2, seed=3, shuffle=True, collate=ids)
    loader.load_state_dict({"epoch": 1, "batch_index": 2})
    assert loader.state_dict() == {"epoch": 1, "position": 8}


def test_loader_eval_epoch_and_wraparound() -> None:
    data = [{"i": i} for i in range(11)]
    per_rank = [eval_batches(data, 2, r, 4) for r in range(4)]
    assert {count for _, count in per_rank} == {2}  # ceil(11 / 8) forwards on every rank
    assert [[len(b) for b in batches] for batches, _ in per_rank] == [[2, 2], [2, 1], [2], [2]]
    covered = [flat(data_loader(data, batches, ids)) for batches, _ in per_rank]
    assert sorted(flat(covered)) == list(range(11))  # every row exactly once, in eval

    wrap = TrainLoader(data, 2, 2, 3, seed=0, shuffle=False, collate=ids, drop_last=False)
    assert wrap.batches_per_epoch == 2
    assert take(iter(wrap), 2) == [[4, 5], [10, 0]]  # the short last batch wraps around


def test_workers_prefetch_but_the_state_counts_what_was_handed_out() -> None:
    """Two worker processes read ahead; the state after k batches is still k batches in,
    and a loader resumed from it hands out exactly the batches that followed."""
    data = Dataset.from_list([{"i": i} for i in range(50)])
    kwargs = {"seed": 4, "shuffle": True, "collate": ids}
    plain = take(iter(TrainLoader(data, 3, 1, 2, **kwargs)), 12)
    loader = TrainLoader(data, 3, 1, 2, workers=2, prefetch=3, **kwargs)
    stream = iter(loader)
    assert take(stream, 5) == plain[:5]
    state = loader.state_dict()
    assert state == {"epoch": 0, "position": 30}  # 5 global batches of 3 x 2, not more
    resumed = TrainLoader(data, 3, 1, 2, workers=2, **kwargs)
    resumed.load_state_dict(state)
    assert take(iter(resumed), 7) == plain[5:]


def test_loaders_leave_the_global_random_generator_alone() -> None:
    """Building and reading a loader (with or without workers) draws nothing from torch's
    global generator, so dropout after an evaluation or a resume is what it would be."""
    data = Dataset.from_list([{"i": i} for i in range(12)])
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for workers in (0, 2):
        take(
            iter(TrainLoader(data, 2, 0, 1, seed=1, shuffle=True, collate=ids, workers=workers)), 3
        )
    assert list(data_loader(data, [[0, 1], [2]], ids)) == [[0, 1], [2]]
    assert torch.equal(torch.get_rng_state(), before)


def test_packing_holds_the_plan_not_the_tokens(tmp_path: Any) -> None:
    """A packed epoch over memory-mapped rows costs memory per row, not per token: the
    rows are assembled when read, and each matches the one made from the full arrays."""
    import tracemalloc

    from datasets import load_from_disk

    rng = np.random.default_rng(4)
    lengths = rng.integers(50, 400, size=8000)
    flat = rng.integers(4, 30000, size=int(lengths.sum())).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = [flat[a:b] for a, b in itertools.pairwise(offsets)]
    Dataset.from_dict({"input_ids": ids, "labels": ids}).save_to_disk(tmp_path / "rows")
    rows = load_from_disk(str(tmp_path / "rows"))
    view = rows.select(np.arange(len(rows))[::-1])  # a `select` view, as a mixture makes

    tracemalloc.start()
    packed = pack(view, seq_len=1024, seed=0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    tokens = int(lengths.sum())  # ~1.8M
    assert peak < 4 * tokens  # materializing the epoch took ~64 bytes a token
    assert packed.members.nbytes + packed.bounds.nbytes < 16 * len(rows)
    assert sorted(packed.members.tolist()) == list(range(len(rows)))

    row = packed[7]
    members = packed.members[packed.bounds[7] : packed.bounds[8]]
    expected = np.concatenate([ids[len(rows) - 1 - m] for m in members])
    assert row["input_ids"][: len(expected)] == expected.tolist()
    assert set(row["input_ids"][len(expected) :]) <= {0}
    assert row["labels"][len(expected) :] == [IGNORE_INDEX] * (1024 - len(expected))


def test_a_saved_plan_packs_the_rows_it_was_made_for_the_same_way() -> None:
    """`bigft data prepare` stores the train rows' bins; a run packing with them gets the
    rows it would get by packing from scratch, for any seed."""
    from bigft.data.packing import PackingPlan, row_lengths

    rows = Dataset.from_list(random_rows(list(np.random.default_rng(5).integers(3, 40, 300))))
    plan = PackingPlan.of(row_lengths(rows), 64)
    for seed in (0, 7):
        assert pack(rows, 64, seed, plan=plan).to_dict() == pack(rows, 64, seed).to_dict()
    assert pack(rows, 64, 0, plan=plan).to_dict() != pack(rows, 64, 7, plan=plan).to_dict()
