"""Read raw rows from files, saved datasets or the hub, with errors that name file and line.

Every loader goes through the `datasets` library (memory-mapped Arrow, cached by file
hash). When the library fails on a malformed JSON Lines file we scan the file ourselves,
because its own message names neither the line nor the file in a way a user can act on.
"""

from __future__ import annotations

import csv
import json
import logging
from functools import lru_cache
from pathlib import Path

import datasets
from datasets import Dataset

from bigft.errors import DataError

SUPPORTED = ".jsonl, .json, .csv, .parquet, a directory saved with Dataset.save_to_disk, hub:NAME"
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(path: str) -> Dataset:
    """Load one data source as a `datasets.Dataset` of raw rows.

    Raises DataError for a missing path, an unsupported extension, malformed JSON
    (naming the first bad line) and a source with no rows.
    """
    if path.startswith("hub:"):
        return _load_hub(path)
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: data file not found (check data.train / validation / test)")
    if p.is_dir():
        return _non_empty(_load_saved(path), path)
    suffix = p.suffix.lower()
    builder = _BUILDERS.get(suffix)
    if builder is None:
        raise DataError(f"{path}: unsupported data file type '{suffix}'; supported: {SUPPORTED}")
    if p.stat().st_size == 0 or (builder == "json" and not p.read_bytes().strip()):
        raise DataError(f"{path}: file has no rows")
    # The library logs its own progress and, on failure, a traceback-worthy error: keep the
    # console for bigft's one-line message.
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        rows = datasets.load_dataset(builder, data_files=str(p), split="train")
    except Exception as exc:  # the library wraps parse errors in several exception types
        raise _explain_load_failure(path, builder, exc) from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    return _non_empty(rows, path)


def _non_empty(rows: Dataset, path: str) -> Dataset:
    if len(rows) == 0:
        raise DataError(f"{path}: file has no rows")
    return rows


def _load_hub(path: str) -> Dataset:
    name = path.removeprefix("hub:")
    try:
        return _non_empty(datasets.load_dataset(name, split="train"), path)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"{path}: could not load hub dataset '{name}' ({_first_line(exc)}); "
            "check the name and network access, or save it locally with save_to_disk"
        ) from None


def _load_saved(path: str) -> Dataset:
    try:
        loaded = datasets.load_from_disk(path)
    except Exception as exc:
        raise DataError(
            f"{path}: directory is not a dataset saved with Dataset.save_to_disk "
            f"({_first_line(exc)})"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(
                f"{path}: saved DatasetDict has no 'train' split (has: {', '.join(loaded)}); "
                "save the split you want with Dataset.save_to_disk"
            )
        return loaded["train"]
    return loaded


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _explain_load_failure(path: str, builder: str, exc: Exception) -> DataError:
    """Turn a `datasets` load failure into one actionable line."""
    if builder == "json":
        bad = _find_bad_json(Path(path))
        if bad is not None:
            return DataError(bad)
        if _json_row_count(Path(path)) == 0:
            return DataError(f"{path}: file has no rows")
    if builder == "csv" and _csv_row_count(Path(path)) == 0:
        return DataError(f"{path}: file has no rows (only a header)")
    # Walk to the root cause: DatasetGenerationError hides the Arrow error in __cause__.
    root: BaseException = exc
    while root.__cause__ is not None:
        root = root.__cause__
    return DataError(f"{path}: could not read {builder} rows ({_first_line(root)})")


def _find_bad_json(path: Path) -> str | None:
    """The first problem in a JSON (array) or JSON Lines file, as `path:LINE: ...`."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            return f"{path}:{err.lineno}: not valid JSON ({err.msg})"
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            return f"{path}: a .json file must hold a list of objects (one per row)"
        return None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            return f"{path}:{number}: not valid JSON ({err.msg})"
        if not isinstance(value, dict):
            return f"{path}:{number}: each line must be a JSON object, got {type(value).__name__}"
    return None


def _json_row_count(path: Path) -> int:
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    if text.startswith("["):
        try:
            return len(json.loads(text))
        except json.JSONDecodeError:
            return -1
    return sum(1 for line in text.splitlines() if line.strip())


def _csv_row_count(path: Path) -> int:
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        return max(0, sum(1 for record in csv.reader(fh) if record) - 1)  # minus the header


@lru_cache(maxsize=16)
def _line_table(path: str, mtime_ns: int) -> tuple[int, ...] | None:
    """1-based file line of each row, for formats where rows are lines; None otherwise.

    `mtime_ns` is only part of the cache key, so an edited file is scanned again.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        text = p.read_text(encoding="utf-8", errors="replace")
        if text.lstrip().startswith("["):
            return None  # a JSON array: rows are elements, not lines
        # The json loader skips blank lines, so row i is the i-th non-blank line.
        return tuple(n for n, line in enumerate(text.splitlines(), start=1) if line.strip())
    if suffix == ".csv":
        # csv.reader tracks physical lines, so quoted cells spanning lines stay exact.
        with p.open(newline="", encoding="utf-8", errors="replace") as fh:
            reader = csv.reader(fh)
            lines: list[int] = []
            header = True
            for record in reader:
                if header:
                    header = False
                    continue
                if record:
                    lines.append(reader.line_num)
            return tuple(lines)
    return None


def row_location(path: str, index: int) -> str:
    """Where row `index` (0-based) of `path` lives: `path:LINE` for line-based files,
    `path[index]` for parquet, saved datasets, JSON arrays and the hub."""
    p = Path(path)
    table = _line_table(path, p.stat().st_mtime_ns) if p.is_file() else None
    if table is not None and 0 <= index < len(table):
        return f"{path}:{table[index]}"
    return f"{path}[{index}]"
