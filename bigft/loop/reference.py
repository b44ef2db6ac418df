"""preference.precompute_reference: the reference model's log-probabilities of every
prepared pair, from one no-grad pass before step 1, so training holds one model.

Before its first step the policy is the reference (full fine-tuning: the loaded weights;
lora / dora / qlora: the base with its adapters disabled), so the pass runs the policy
itself, in evaluation mode, on the engine it trains with. It runs in `setup`, before a
checkpoint is restored, so a resumed run scores the same weights. Each process scores
its share of each split (the evaluation order, every process the same number of forwards
for ZeRO-3 / FSDP2) and the shares are gathered, so every process ends with all values.

The values are kept beside the prepared data: `<preparation>/reference/<key>.npz`, one
array per split and side, in the split's row order. The key covers what they depend on:
the model's files, the method (and its quantization), train.precision and bigft's
version; another run of the same data and model reuses them. Every process reuses them
or none does (a store not shared between nodes may hold them on some only). With
data.cache false they are computed again each run and written nowhere.

The rows gain columns `ref_chosen` and `ref_rejected`; the collator hands them to the
loss as `ref_logps`, in place of a reference forward.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from bigft import __version__
from bigft.config import Config
from bigft.data import eval_batches as rank_batches
from bigft.data.labeled import make_collator
from bigft.data.pipeline import SPLITS, PreparedData
from bigft.data.prepared import file_state
from bigft.engine.accelerator import print_on_main
from bigft.engine.settings import BatchLayout
from bigft.loop.preference import initial_logps
from bigft.preference_losses import needs_reference

COLUMNS = ("ref_chosen", "ref_rejected")
FOLDER = "reference"


def reference_key(cfg: Config) -> str:
    """A digest of what the reference log-probabilities depend on besides the rows."""
    method = cfg.method
    inputs = {
        "bigft": __version__,
        "model": file_state(str(cfg.model.name_or_path)),
        "name": str(cfg.model.name_or_path),
        "method": method.name,
        "quant": method.quant.model_dump(mode="json") if method.name == "qlora" else None,
        "precision": cfg.train.precision,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def attach_reference(
    cfg: Config,
    accelerator: Any,
    model: Any,
    data: PreparedData,
    collate: Any,
    batch_size: int,
    preparation: Path | None,
    console: Console,
) -> tuple[PreparedData, str]:
    """`data` with each split's reference log-probabilities as columns `ref_chosen` and
    `ref_rejected`, and one line on where they came from."""
    start = time.perf_counter()
    splits = {name: getattr(data, name) for name in SPLITS if getattr(data, name) is not None}
    pairs = sum(len(rows) for rows in splits.values())
    path = None if preparation is None else preparation / FOLDER / f"{reference_key(cfg)}.npz"
    values = _read(path, splits) if path is not None else None
    found = torch.tensor([float(values is not None)], device=accelerator.device)
    if values is None or accelerator.gather(found).min().item() < 1:
        print_on_main(
            accelerator,
            console,
            f"reference: scoring {pairs:,} pairs before step 1 (preference.precompute_reference)",
            highlight=False,
        )
        values = {
            name: _score(model, accelerator, rows, collate, batch_size)
            for name, rows in splits.items()
        }
        how = f"computed in {time.perf_counter() - start:.1f} s"
        if path is None:
            how += " (data.cache is false: not stored)"
        elif accelerator.is_main_process:
            try:
                _write(path, values)
                how += f", stored in {path}"
            except OSError as exc:  # a read-only store still serves its prepared rows
                how += f" (not stored: {path.parent}: {exc.strerror})"
    else:
        how = f"reused from {path}"
    columns = {
        name: rows.add_column(COLUMNS[0], values[name][0]).add_column(COLUMNS[1], values[name][1])
        for name, rows in splits.items()
    }
    return replace(data, **columns), f"precomputed for {pairs:,} pairs: {how}"


def _score(
    model: Any, accelerator: Any, rows: Any, collate: Any, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) summed reference log-probabilities of every row of a split."""
    rank, world = accelerator.process_index, accelerator.num_processes
    batches, count = rank_batches(rows, batch_size, rank, world)
    # (row index, chosen, rejected) per slot; -1 marks a slot without a row
    found = torch.full((count * batch_size, 3), -1.0, dtype=torch.float64)
    was_training = model.training
    model.eval()
    for i in range(count):
        # a process short of rows scores row 0 again: sharded engines gather weights
        # inside forward, so every process runs the same number of forwards
        members = batches[i] if i < len(batches) else [0]
        batch = collate([rows[j] for j in members])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        sums, _ = initial_logps(model, batch, accelerator.unwrap_model)
        if i < len(batches):
            n = len(members)
            lo = i * batch_size
            found[lo : lo + n, 0] = torch.tensor(members, dtype=torch.float64)
            found[lo : lo + n, 1] = sums[:n].double().cpu()
            found[lo : lo + n, 2] = sums[n : 2 * n].double().cpu()
    model.train(was_training)
    if hasattr(model, "empty_partition_cache"):  # ZeRO-3: release prefetched parameters
        model.empty_partition_cache()
    every = accelerator.gather(found.to(accelerator.device)).cpu()
    every = every[every[:, 0] >= 0]
    index = every[:, 0].long().numpy()
    chosen = np.zeros(len(rows), dtype=np.float32)
    rejected = np.zeros(len(rows), dtype=np.float32)
    chosen[index] = every[:, 1].numpy()
    rejected[index] = every[:, 2].numpy()
    return chosen, rejected


def _read(path: Path, splits: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """The stored values when they cover exactly these splits' rows; None otherwise."""
    try:
        with np.load(path) as saved:
            values = {name: (saved[f"{name}_chosen"], saved[f"{name}_rejected"]) for name in splits}
    except (OSError, KeyError, ValueError):
        return None
    if any(len(values[name][0]) != len(rows) for name, rows in splits.items()):
        return None
    return values


def _write(path: Path, values: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Write beside the prepared data through a temporary file of this process, renamed
    into place: a reader sees all of it or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    arrays = {
        f"{name}_{side}": array
        for name, pair in values.items()
        for side, array in zip(("chosen", "rejected"), pair, strict=True)
    }
    np.savez(tmp, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)


def preference_reference(
    cfg: Config,
    accelerator: Any,
    model: Any,
    data: PreparedData,
    teacher: Any,
    tokenizer: Any,
    layout: BatchLayout,
    folder: Path | None,
    console: Console,
) -> tuple[PreparedData, str]:
    """Task preference's data (with preference.precompute_reference, the reference
    log-probabilities as columns) and what the reference is, in words."""
    if not needs_reference(cfg.preference):
        return data, f"none (loss {cfg.preference.loss} is reference-free)"
    if cfg.preference.precompute_reference:
        collate = make_collator(cfg, tokenizer)
        batch_size = cfg.eval.batch_size or layout.micro_batch_size
        return attach_reference(cfg, accelerator, model, data, collate, batch_size, folder, console)
    if teacher is not None:
        return data, "a frozen copy of the model, laid out like the policy"
    return data, "the model with its adapters disabled"
