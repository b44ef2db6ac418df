"""Read raw rows from files, saved datasets or the hub, with errors that name file and line.

Every loader goes through the `datasets` library (memory-mapped Arrow, cached by file
hash). When the library fails on a malformed JSON Lines file we scan the file ourselves,
because its own message names neither the line nor the file in a way a user can act on.
Text files are checked to be UTF-8 before the library sees them.
"""

from __future__ import annotations

import codecs
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
    if p.stat().st_size == 0 or (builder == "json" and _blank(p)):
        raise DataError(f"{path}: file has no rows")
    if builder in ("json", "csv"):
        # The library reads any bytes: Arrow's JSON reader accepts invalid UTF-8 inside
        # strings and fails only when a row is read later, far from the file.
        _check_utf8(p, path)
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


_BOMS = {
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\xfe\xff": "UTF-16",
    b"\xff\xfe": "UTF-16",
}
_CHUNK_BYTES = 1 << 20  # read size of the UTF-8 check


def _iconv(p: Path, encoding: str) -> str:
    return f"iconv -f {encoding} -t UTF-8 {p.name} > {p.stem}.utf8{p.suffix}"


def _blank(p: Path) -> bool:
    """Whether the file holds only whitespace (read in chunks, up to its first other byte)."""
    with p.open("rb") as fh:
        while chunk := fh.read(_CHUNK_BYTES):
            if chunk.strip():
                return False
    return True


def _check_utf8(p: Path, path: str) -> None:
    """Raise DataError unless the file is UTF-8 text (a UTF-8 byte-order mark is fine).

    Read in chunks with an incremental decoder, so a large file is never held in memory.
    """
    with p.open("rb") as fh:
        head = fh.read(4)
        for bom, encoding in _BOMS.items():
            if head.startswith(bom):
                raise DataError(
                    f"{path}: file is {encoding} text (it starts with a {encoding} byte-order "
                    f"mark); convert it to UTF-8, e.g. {_iconv(p, encoding)}"
                )
        fh.seek(0)
        decoder = codecs.getincrementaldecoder("utf-8")()
        line = 1  # line number at the start of `chunk`
        while chunk := fh.read(_CHUNK_BYTES):
            if b"\0" in chunk:  # the first chunk tells UTF-16 text from binary data
                raise DataError(_nul_message(p, path, chunk if line == 1 else b""))
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                # err.start counts from the bytes the decoder held: this chunk after at most
                # three bytes of a character left unfinished by the previous one.
                bad = max(err.start - (len(err.object) - len(chunk)), 0)
                where = line + chunk.count(b"\n", 0, bad)
                raise DataError(
                    f"{path}:{where}: not valid UTF-8 (byte "
                    f"0x{err.object[err.start]:02x}); convert the file to UTF-8 (from Latin-1: "
                    f"{_iconv(p, 'LATIN1')})"
                ) from None
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(
                f"{path}:{line}: not valid UTF-8 (the file ends inside a character); "
                "convert the file to UTF-8"
            ) from None


def _nul_message(p: Path, path: str, head: bytes) -> str:
    """NUL bytes: UTF-16 text without a byte-order mark (every other byte of ASCII text is
    NUL), or not text at all."""
    for encoding, zeros in (("UTF-16LE", head[1::2]), ("UTF-16BE", head[0::2])):
        if len(zeros) >= 8 and zeros.count(0) >= 0.9 * len(zeros):
            return (
                f"{path}: file looks like {encoding} text (every other byte is NUL); convert "
                f"it to UTF-8, e.g. {_iconv(p, encoding)}"
            )
    return (
        f"{path}: not a text file (it holds NUL bytes); data files are UTF-8 text: check "
        "that this is the right file, or convert it to UTF-8"
    )


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
