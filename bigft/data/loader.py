"""Rank-sharded, resumable batches through torchdata's `StatefulDataLoader`.

Which rows a rank reads is decided by `ShardedBatchSampler`, a pure function of
(seed, epoch, position in rows): epoch e visits the rows in a permutation seeded by
(seed, e), or in order when shuffle is off; global batch k is `batch_size * world_size`
consecutive entries of that order and rank r takes entries [r * batch_size,
(r + 1) * batch_size) of it, so ranks are disjoint and together cover the global batch.
With drop_last=False the last global batch of an epoch wraps around to the epoch's first
rows, so every rank still gets a full batch.

`StatefulDataLoader` fetches and collates those batches, in worker processes with
prefetch and pinned memory when asked (`data.loader_workers`). Workers run ahead of
training, so the position a checkpoint keeps is the one of the batches *handed to the
training loop*: `TrainLoader` counts them as they are yielded. The position is kept in
rows of the epoch's order, not in batches, so a state taken on one world size resumes at
the exact next row on another.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from bigft import faults
from bigft._compat import stateful_dataloader
from bigft.errors import DataError


class ShardedBatchSampler(Sampler[list[int]]):
    """One rank's batches of row indices, from (epoch, position) on, epoch after epoch."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool,
        drop_last: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.n = n
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.global_batch = batch_size * world_size
        self.epoch = 0
        self.position = 0  # rows of this epoch's order already handed out (all ranks)
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def batches_per_epoch(self) -> int:
        n = self.n
        return n // self.global_batch if self.drop_last else math.ceil(n / self.global_batch)

    def order(self, epoch: int) -> np.ndarray:
        """Row indices of `epoch` in visiting order (the same on every rank)."""
        if self._order is None or self._order[0] != epoch:
            rows = (
                np.random.default_rng([self.seed, epoch]).permutation(self.n)
                if self.shuffle
                else np.arange(self.n)
            )
            self._order = (epoch, rows)
        return self._order[1]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch = int(state["epoch"])
        if "position" in state:
            self.position = int(state["position"])
        else:  # checkpoints that counted batches, of the same layout
            self.position = int(state["batch_index"]) * self.global_batch

    def advance(self) -> tuple[np.ndarray, np.ndarray]:
        """Move to the next batch: (its positions in the epoch's order, its row indices)."""
        remaining = self.n - self.position
        if remaining <= 0 or (self.drop_last and remaining < self.global_batch):
            self.epoch, self.position = self.epoch + 1, 0
        order = self.order(self.epoch)
        start = self.position + self.rank * self.batch_size
        positions = np.arange(start, start + self.batch_size) % len(order)
        self.position += self.global_batch
        return positions, order[positions]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.advance()[1].tolist()


class TrainLoader:
    """Training batches for one rank: endless, deterministic, resumable at the exact row.

    `collate` may be replaced before iterating (the model decides the batch shape).
    `state_dict()` is the position after the last batch handed out.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool,
        collate: Callable[[list[Any]], Any],
        drop_last: bool = True,
        workers: int = 0,
        pin_memory: bool = False,
        prefetch: int = 2,
    ) -> None:
        self.dataset = dataset
        self.collate = collate
        self.workers = workers
        self.pin_memory = pin_memory
        self.prefetch = prefetch
        # Consumed: what the training loop has been handed.
        self.consumed = ShardedBatchSampler(
            len(dataset), batch_size, rank, world_size, seed, shuffle, drop_last
        )
        self._record = faults.row_recorder(rank)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"the training split has {len(dataset)} rows, fewer than one global batch "
                f"(micro_batch_size {batch_size} x {world_size} processes); add data or "
                "lower the batch size"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.consumed.batches_per_epoch

    @property
    def epoch_progress(self) -> float:
        """Epochs completed, fractional: epoch + rows handed out / rows per epoch."""
        return self.consumed.epoch + self.consumed.position / self.consumed.n

    def order(self, epoch: int) -> np.ndarray:
        return self.consumed.order(epoch)

    def state_dict(self) -> dict[str, int]:
        return self.consumed.state_dict()

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.consumed.load_state_dict(state)

    def __iter__(self) -> Iterator[Any]:
        c = self.consumed
        sampler = ShardedBatchSampler(
            c.n, c.batch_size, c.rank, c.world_size, c.seed, c.shuffle, c.drop_last
        )
        sampler.load_state_dict(c.state_dict())
        batches: Any = (
            _EpochTagged(sampler) if getattr(self.dataset, "wants_epoch", False) else sampler
        )
        loader = data_loader(
            self.dataset, batches, self.collate, self.workers, self.pin_memory, self.prefetch
        )
        for batch in loader:
            # Advance before yielding: a state_dict taken while the consumer holds this
            # batch already points at the next one.
            positions, rows = c.advance()
            if self._record is not None:
                self._record(c.epoch, positions, rows)
            yield batch


class _EpochTagged(Sampler[list[tuple[int, int]]]):
    """A sampler's batches as (epoch, row) pairs, for rows whose treatment depends on the
    epoch (`bigft.data.images.EpochRows`: image augmentation)."""

    def __init__(self, sampler: ShardedBatchSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        while True:
            rows = self.sampler.advance()[1]
            yield [(self.sampler.epoch, int(r)) for r in rows]


def data_loader(
    dataset: Any,
    batch_sampler: Sampler[list[int]] | Sequence[list[int]] | None,
    collate: Callable[[list[Any]], Any],
    workers: int = 0,
    pin_memory: bool = False,
    prefetch: int = 2,
    batch_size: int | None = None,
) -> Any:
    """A torchdata `StatefulDataLoader` over `dataset` in the batches `batch_sampler`
    gives (an iterable dataset: in full batches of `batch_size`).

    The loader gets a generator of its own: each iterator draws a seed for its workers,
    which would otherwise come from torch's global generator and shift the dropout masks
    of the training that follows (a resumed run, or one that evaluates, would no longer
    match an uninterrupted one)."""
    batching: dict[str, Any] = (
        {"batch_sampler": batch_sampler}
        if batch_sampler is not None
        else {"batch_size": batch_size, "drop_last": True}
    )
    return stateful_dataloader(
        dataset,
        **batching,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        prefetch_factor=prefetch if workers else None,
        generator=torch.Generator().manual_seed(0),
    )


def eval_batches(
    dataset: Any, batch_size: int, rank: int, world_size: int
) -> tuple[list[list[int]], int]:
    """One pass in dataset order for evaluation: (this rank's batches of row indices, the
    most batches any rank has). No shuffle, no drop_last, no wrap: the last global batch
    may leave a rank with a short batch or none."""
    n = len(dataset)
    global_batch = batch_size * world_size
    batches = []
    for start in range(0, n, global_batch):
        lo = start + rank * batch_size
        hi = min(lo + batch_size, n)
        if lo < hi:
            batches.append(list(range(lo, hi)))
    return batches, math.ceil(n / global_batch)
