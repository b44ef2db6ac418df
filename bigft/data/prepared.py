"""Prepared datasets: the tokenized, masked, cleaned and split rows of a config, written once
and reused by every process and every later run that asks for the same thing.

A preparation is a folder `<store>/<fingerprint>/` holding each split as an Arrow dataset
(`Dataset.save_to_disk`, memory-mapped when loaded), the statistics and the class names.
The fingerprint covers everything the rows depend on: the data settings, the files (path,
size, modification time), what text augmentation reads (the synonyms file's contents, the
back-translation model directories' files), the tokenizer (its vocabulary, merges, special
tokens and chat template), train.seq_len, train.seed (the split) and the task (task
preference: with section preference), and bigft's version.

One process prepares; the others wait on a file, not in a collective with a timeout. The
first to create `<fingerprint>.lock` (O_EXCL) writes into a temporary folder of its own
and renames it into place when complete, so a folder under its final name is always a
whole preparation; a killed preparation leaves only its temporary folder and lock. The
lock names its host and process and is touched while the work goes on: a waiter takes
over a lock whose process is gone (same host) or that has not moved for `STALE_S`
seconds (another host), and removes the temporary folder that process left, which bigft
created. Nothing else in the store is deleted, except by `bigft data prune`
(`bigft.data.store`): reusing a preparation touches its folder, so its modification time
says when a run last used it.

Where: `data.prepared_dir`, or `bigft-prepared/` in the datasets library's cache
(`HF_DATASETS_CACHE`, by default ~/.cache/huggingface/datasets); on a cluster, a shared
filesystem lets one process of the whole job prepare. `data.cache: false` prepares in
memory every time and writes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from bigft import __version__
from bigft.config import IMAGE_TASKS, Config, DataConfig, PreferenceConfig, TextAugmentConfig
from bigft.data.packing import PackingPlan
from bigft.data.pipeline import SPLITS, DataStats, PreparedData, SplitStats
from bigft.errors import DataError
from bigft.rundir import process_alive

log = logging.getLogger(__name__)

STALE_S = 120.0  # a lock not touched for this long, by a process on another host, is dead
HEARTBEAT_S = 10.0
POLL_S = 0.5
_STATS, _LABELS, _PLAN = "stats.json", "labels.json", "train_plan.npz"
Prepared = tuple[PreparedData, list[str] | None]


@dataclass
class Preparation:
    """Where a config's prepared data lives and what happened to it in this process:
    'prepared' (this process wrote it), 'reused' (it was there) or 'waited' (another
    process wrote it meanwhile); 'in memory' when data.cache is false."""

    path: Path | None
    fingerprint: str
    outcome: str
    seconds: float


def store_dir(cfg: DataConfig) -> Path:
    """The folder holding every prepared dataset of this config's store."""
    if cfg.prepared_dir is not None:
        return Path(cfg.prepared_dir)
    import datasets

    cache = os.environ.get("HF_DATASETS_CACHE") or datasets.config.HF_DATASETS_CACHE
    return Path(cache).expanduser() / "bigft-prepared"


def fingerprint(
    cfg: DataConfig,
    tokenizer: Any,
    seq_len: int,
    seed: int,
    task: str,
    preference: PreferenceConfig | None = None,
) -> str:
    """A digest of everything the prepared rows depend on (see the module docstring);
    task preference adds section `preference` (its fields name the columns and its loss
    picks paired or kto rows)."""
    settings = cfg.model_dump(
        mode="json",
        exclude={
            "prepared_dir",
            "num_proc",
            "cache",
            "shuffle",
            "loader_workers",
            "loader_prefetch",
        },
    )
    # A mixture's weights, epoch counts and names are applied when a run starts
    # (bigft.data.mixture): they do not change the prepared rows.
    settings["train"] = [
        {
            k: v
            for k, v in s.model_dump(mode="json").items()
            if k not in ("weight", "epochs", "name")
        }
        for s in cfg.train_sources
    ]
    sources = [*cfg.train_files, *(p for p in (cfg.validation, cfg.test) if p is not None)]
    inputs = {
        "bigft": __version__,
        "task": task,
        "seq_len": seq_len,
        "seed": seed,
        "data": settings,
        "files": {str(p): file_state(str(p)) for p in sources},
        "tokenizer": _tokenizer_digest(tokenizer),
    }
    if task == "preference":
        inputs["preference"] = (preference or PreferenceConfig()).model_dump(mode="json")
    if cfg.augment.text is not None:  # its settings are in "data"; these are its inputs
        inputs["augment_text"] = _augment_inputs(cfg.augment.text)
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def _augment_inputs(cfg: TextAugmentConfig) -> dict[str, Any]:
    """What data.augment.text reads: the synonyms file's contents (a digest), the
    back-translation model directories' files (size, modification time)."""
    out: dict[str, Any] = {}
    if cfg.synonyms and cfg.synonyms != "wordnet" and Path(cfg.synonyms).is_file():
        out["synonyms"] = hashlib.sha256(Path(cfg.synonyms).read_bytes()).hexdigest()
    if cfg.back_translation is not None:
        bt = cfg.back_translation
        out["back_translation"] = [file_state(bt.forward), file_state(bt.backward)]
    return out


def file_state(path: str) -> list[Any]:
    """(size, modification time) of a file, or of every file under a directory; a hub
    name is taken as it is."""
    p = Path(path)
    if path.startswith("hub:") or not p.exists():
        return []
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return [
        [str(f.relative_to(p)) if p.is_dir() else "", f.stat().st_size, f.stat().st_mtime_ns]
        for f in files
    ]


def _tokenizer_digest(tokenizer: Any) -> str:
    parts = [type(tokenizer).__name__, str(getattr(tokenizer, "chat_template", None))]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        parts.append(backend.to_str())
    else:
        parts.append(json.dumps(tokenizer.get_vocab(), sort_keys=True))
    parts.append(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str))
    parts.append(str(tokenizer.padding_side))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def load_or_prepare(
    cfg: DataConfig,
    tokenizer: Any,
    seq_len: int,
    seed: int,
    task: str,
    prepare: Callable[[], Prepared],
    preference: PreferenceConfig | None = None,
) -> tuple[PreparedData, list[str] | None, Preparation]:
    """The prepared data of this config: loaded from the store when a whole preparation
    with the same fingerprint is there, else prepared (by `prepare`) by the first process
    to take the lock and waited for by the others."""
    start = time.perf_counter()
    digest = fingerprint(cfg, tokenizer, seq_len, seed, task, preference)
    if not cfg.cache:
        data, labels = prepare()
        return data, labels, Preparation(None, digest, "in memory", time.perf_counter() - start)
    root = store_dir(cfg)
    final = root / digest
    waited = False
    while True:
        if final.is_dir():
            data, labels = _load(final)
            with contextlib.suppress(OSError):  # last used (bigft data prune); may be read-only
                os.utime(final)
            outcome = "waited" if waited else "reused"
            return data, labels, Preparation(final, digest, outcome, time.perf_counter() - start)
        with _lock(root, digest) as held:
            if held:
                if final.is_dir():  # finished between the check and the lock
                    continue
                data, labels = prepare()
                _write(final, data, labels)
                done = Preparation(final, digest, "prepared", time.perf_counter() - start)
                return data, labels, done
        waited = True
        time.sleep(POLL_S)


@contextlib.contextmanager
def _lock(root: Path, digest: str) -> Iterator[bool]:
    """Take `<digest>.lock` if nobody holds it (True), touching it while held; False when
    a live process holds it. A dead holder's lock and temporary folder are removed."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"{root}: cannot create the prepared-data folder ({exc.strerror}); "
            "set data.prepared_dir to a writable folder"
        ) from None
    path = root / f"{digest}.lock"
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        _clear_if_dead(path, root)
        yield False
        return
    with os.fdopen(fd, "w") as handle:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}, handle)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, stop), daemon=True)
    beat.start()
    try:
        yield True
    finally:
        stop.set()
        beat.join()
        path.unlink(missing_ok=True)


def _heartbeat(path: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(path)


def _clear_if_dead(path: Path, root: Path) -> None:
    """Remove a lock whose process is gone, and the temporary folder it was writing."""
    try:
        holder = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
    except (OSError, ValueError):
        return  # being written or removed right now: look again at the next poll
    same_host = holder.get("host") == socket.gethostname()
    dead = not process_alive(int(holder.get("pid", -1))) if same_host else age > STALE_S
    if not dead:
        return
    tmp = root / _tmp_name(path.stem, holder.get("host"), holder.get("pid"))
    log.warning(
        "prepared data: %s was held by process %s on %s, which is gone; removing it%s",
        path,
        holder.get("pid"),
        holder.get("host"),
        f" and its unfinished {tmp.name}" if tmp.exists() else "",
    )
    shutil.rmtree(tmp, ignore_errors=True)
    path.unlink(missing_ok=True)


def _tmp_name(digest: str, host: Any, pid: Any) -> str:
    return f".{digest}.tmp-{host}-{pid}"


def _write(final: Path, data: PreparedData, labels: list[str] | None) -> None:
    """Write the preparation into this process's temporary folder, then rename it into
    place (the rename is atomic: readers see all of it or nothing)."""
    tmp = final.parent / _tmp_name(final.name, socket.gethostname(), os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in SPLITS:
        split = getattr(data, name)
        if split is not None:
            split.save_to_disk(str(tmp / name))
    (tmp / _STATS).write_text(json.dumps(data.stats.to_dict(), indent=2))
    (tmp / _LABELS).write_text(json.dumps(labels))
    if data.train_plan is not None:  # a run starts without packing the rows again
        plan = data.train_plan
        np.savez(tmp / _PLAN, members=plan.members, bounds=plan.bounds)
    os.rename(tmp, final)


def _load(path: Path) -> Prepared:
    try:
        splits = {
            name: Dataset.load_from_disk(str(path / name)) if (path / name).is_dir() else None
            for name in SPLITS
        }
        stats = json.loads((path / _STATS).read_text())
        labels = json.loads((path / _LABELS).read_text())
        plan = None
        if (path / _PLAN).is_file():
            with np.load(path / _PLAN) as saved:
                plan = PackingPlan(saved["members"], saved["bounds"])
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{path}: the prepared data cannot be read ({exc}); delete that folder to "
            "prepare it again"
        ) from None
    if splits["train"] is None:
        raise DataError(f"{path}: the prepared data has no train split; delete that folder")
    split_stats = {k: SplitStats(**v) for k, v in stats.pop("splits").items()}
    data = PreparedData(
        splits["train"],
        splits["validation"],
        splits["test"],
        DataStats(splits=split_stats, **stats),
        plan,
    )
    return data, labels


def prepared_for_task(
    cfg: Config, tokenizer: Any
) -> tuple[PreparedData, list[str] | None, Preparation]:
    """The run's data (`bigft.data.labeled.prepare_for_task`) through the store: what
    `bigft train` and `bigft data prepare` use."""
    from bigft.data.labeled import prepare_for_task
    from bigft.data.streaming import prepare_heldout

    seq_len, seed = cfg.train.seq_len, cfg.train.seed
    if cfg.task in IMAGE_TASKS:
        # Image rows hold references, checked in one pass over the files: nothing to store.
        from bigft.data.images import prepare_images

        start = time.perf_counter()
        data, names = prepare_images(cfg)
        return data, names, Preparation(None, "", "checked", time.perf_counter() - start)

    def prepare() -> Prepared:
        if cfg.data.streaming:
            return prepare_heldout(cfg.data, tokenizer, seq_len, seed), None
        return prepare_for_task(cfg.data, tokenizer, seq_len, seed, cfg.task, cfg.preference)

    return load_or_prepare(cfg.data, tokenizer, seq_len, seed, cfg.task, prepare, cfg.preference)


def preparation_text(p: Preparation) -> str:
    """One line on where the data came from, for the start-up output."""
    if p.outcome == "checked":
        return f"data: images checked in {p.seconds:.1f} s (read and augmented as batches are made)"
    if p.path is None:
        return f"data: prepared in memory in {p.seconds:.1f} s (data.cache is false)"
    verb = {
        "prepared": "prepared into",
        "reused": "reused from",
        "waited": "prepared by another process into",
    }
    return f"data: {verb[p.outcome]} {p.path} ({p.seconds:.1f} s)"
