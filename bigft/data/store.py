"""The prepared-data store as a whole (`bigft data prune`): which preparations it holds,
their size, sources and when a run last used them, and removing the ones unused for a
while.

Only what bigft wrote is ever removed: a folder named by a fingerprint (20 hex digits)
holding a preparation's stats.json and labels.json. Anything else in the store folder is
listed as skipped and left alone, and so is a preparation whose lock is held (it is being
written or read right now). "Last used" is the folder's modification time, which
`bigft.data.prepared` touches each time a run reuses it.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

_FINGERPRINT = re.compile(r"[0-9a-f]{20}")
_MARKERS = ("stats.json", "labels.json")
DAY_S = 86400.0


@dataclass
class Entry:
    """One preparation in the store."""

    path: Path
    size_bytes: int
    last_used: float  # seconds since the epoch
    sources: list[str] = field(default_factory=list)
    locked: bool = False

    def idle_days(self, now: float) -> float:
        return max(now - self.last_used, 0.0) / DAY_S


@dataclass
class StoreListing:
    """What the store folder holds: bigft's preparations and what it does not own."""

    root: Path
    entries: list[Entry]
    skipped: list[Path]


def list_store(root: Path) -> StoreListing:
    """The preparations under `root`, least recently used first."""
    entries: list[Entry] = []
    skipped: list[Path] = []
    if not root.is_dir():
        return StoreListing(root, entries, skipped)
    for path in sorted(root.iterdir()):
        if path.suffix == ".lock" and _FINGERPRINT.fullmatch(path.stem):
            continue  # a preparation's lock: reported with it
        if path.name.startswith(".") and ".tmp-" in path.name:
            continue  # a preparation being written (the next preparation clears a dead one)
        if not (path.is_dir() and _FINGERPRINT.fullmatch(path.name) and _is_preparation(path)):
            skipped.append(path)
            continue
        entries.append(
            Entry(
                path=path,
                size_bytes=sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
                last_used=path.stat().st_mtime,
                sources=_sources(path),
                locked=(root / f"{path.name}.lock").exists(),
            )
        )
    entries.sort(key=lambda e: e.last_used)
    return StoreListing(root, entries, skipped)


def _is_preparation(path: Path) -> bool:
    return all((path / name).is_file() for name in _MARKERS)


def _sources(path: Path) -> list[str]:
    try:
        splits = json.loads((path / "stats.json").read_text()).get("splits", {})
        return sorted({str(s.get("source")) for s in splits.values() if s.get("source")})
    except (OSError, ValueError, AttributeError):
        return []


def prune(listing: StoreListing, unused_days: float, now: float | None = None) -> list[Entry]:
    """Remove the preparations not used for `unused_days` days (not a locked one), and
    return them."""
    now = time.time() if now is None else now
    removed = []
    for entry in stale(listing, unused_days, now):
        shutil.rmtree(entry.path)
        removed.append(entry)
    return removed


def stale(listing: StoreListing, unused_days: float, now: float) -> list[Entry]:
    """The preparations `prune` would remove."""
    return [e for e in listing.entries if not e.locked and e.idle_days(now) >= unused_days]
