"""Text augmentation of a prepared training split (data.augment.text).

Applied after the split, to the training rows only: validation and test rows are never
changed, and an augmented copy of a training row can only ever be a training row. Each
training row's raw row is read again from its file, its texts are augmented
(`bigft.data.augment_text`), and every copy that differs from the row becomes a new raw
row, encoded by the same function as the originals and appended after them (so exact
duplicate removal keeps an original over a copy equal to it).

What is augmented, per row shape:
- text (task causal_lm): the text field;
- alpaca: the instruction and the input (the prompt side); the output is kept;
- chat: the content of the user turns; system, assistant and tool turns are kept;
- classification / regression: data.text_field and data.text_pair_field; the label is kept.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset, concatenate_datasets

from bigft.data.augment_text import TextAugmenter
from bigft.data.chat import ROLE_ALIASES
from bigft.data.mixture import SOURCE
from bigft.data.sources import load_rows, row_location

EXAMPLES = 5  # rows recorded, with their copies, for `bigft data preview`
SNIPPET = 400  # characters of each text recorded
AUGMENTED = " (augmented)"  # appended to the `source` of augmented rows, for reports


class RowTexts:
    """Which texts of a raw row augmentation changes: named string fields, or the
    content of a chat's user turns (OpenAI `messages` or ShareGPT `conversations`)."""

    def __init__(self, fields: Sequence[str] = (), chat: bool = False) -> None:
        self.fields, self.chat = tuple(fields), chat

    @classmethod
    def of_format(cls, fmt: str, text_field: str) -> RowTexts:
        """The texts of a causal-LM row of data.format `fmt`."""
        if fmt == "chat":
            return cls(chat=True)
        return cls(("instruction", "input") if fmt == "alpaca" else (text_field,))

    def _user_turns(self, row: Mapping[str, Any]) -> tuple[str | None, list[int]]:
        """(the turns' key, indices of the user turns whose content is a string)."""
        key = next((k for k in ("messages", "conversations") if row.get(k) is not None), None)
        turns = row.get(key) if key else None
        if not isinstance(turns, list):
            return None, []
        found = []
        for j, turn in enumerate(turns):
            if not isinstance(turn, Mapping):
                continue
            role = turn.get("role") if turn.get("role") is not None else turn.get("from")
            if ROLE_ALIASES.get(str(role).strip().lower()) == "user" and _content(turn) != "":
                found.append(j)
        return key, found

    def names(self, row: Mapping[str, Any]) -> list[str]:
        """What each text of `get(row)` is, for the preview."""
        if self.chat:
            return [f"user turn {n + 1}" for n in range(len(self._user_turns(row)[1]))]
        return list(self.fields)

    def get(self, row: Mapping[str, Any]) -> list[str]:
        """The row's texts ("" for a field that is missing or not a string)."""
        if self.chat:
            key, users = self._user_turns(row)
            turns = row[key] if key else []
            return [_content(turns[j]) for j in users]
        return [v if isinstance(v := row.get(name), str) else "" for name in self.fields]

    def put(self, row: Mapping[str, Any], texts: Sequence[str]) -> dict[str, Any]:
        """A copy of `row` holding `texts` (fields that were not strings stay as they were)."""
        out = copy.deepcopy(dict(row))
        if self.chat:
            key, users = self._user_turns(row)
            for j, text in zip(users, texts, strict=True):
                turn = out[str(key)][j]
                turn["content" if turn.get("content") is not None else "value"] = text
            return out
        for name, text in zip(self.fields, texts, strict=True):
            if isinstance(row.get(name), str):
                out[name] = text
        return out


def _content(turn: Mapping[str, Any]) -> str:
    value = turn.get("content") if turn.get("content") is not None else turn.get("value")
    return value if isinstance(value, str) else ""


@dataclass
class AugmentReport:
    """How many rows augmentation added, and a few of them with their originals."""

    added: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)


def augment_file_rows(
    raw: Dataset,
    rows: Sequence[int],
    texts: RowTexts,
    augmenter: TextAugmenter,
    source: int,
    path: str,
    report: AugmentReport,
) -> tuple[Dataset, np.ndarray]:
    """The augmented copies of rows `rows` of `raw` (the raw rows of `path`, source
    `source` of the data): (the new raw rows, each one's row index in `raw`)."""
    originals = raw.select(rows).to_list()
    texts_of = [texts.get(row) for row in originals]
    copies = augmenter.augment(texts_of, [(source, int(r)) for r in rows])
    new_rows: list[dict[str, Any]] = []
    origins: list[int] = []
    for row, index, before, made in zip(originals, rows, texts_of, copies, strict=True):
        for _, after in made:
            new_rows.append(texts.put(row, after))
            origins.append(int(index))
        if made and len(report.examples) < EXAMPLES:
            report.examples.append(
                {
                    "location": row_location(path, int(index)),
                    "fields": texts.names(row),
                    "original": [t[:SNIPPET] for t in before],
                    "copies": [
                        {"technique": technique, "texts": [t[:SNIPPET] for t in after]}
                        for technique, after in made
                    ],
                }
            )
    report.added += len(new_rows)
    return Dataset.from_list(new_rows, features=raw.features), np.asarray(origins, np.int64)


def augment_split(
    train: Dataset,
    paths: Sequence[str],
    texts_of: Callable[[int], RowTexts],
    augmenter: TextAugmenter,
    encode: Callable[[Dataset, int], Dataset],
) -> tuple[Dataset, AugmentReport]:
    """`train` (encoded rows with `source` (path) and `row` columns, and `SOURCE` for a
    mixture) followed by the encoded augmented copies of its rows.

    `paths[i]` is the file of source i, `texts_of(i)` the texts of its rows, and
    `encode(raw_rows, i)` encodes raw rows of source i like the originals. Augmented rows
    keep their original's row index, under source `<path> (augmented)`.
    """
    report = AugmentReport()
    cols = train.select_columns(
        ["source", "row", *([SOURCE] if SOURCE in train.column_names else [])]
    )[:]
    if SOURCE in cols:
        source_ids = np.asarray(cols[SOURCE], dtype=np.int64)
    else:
        index = {path: i for i, path in reversed(list(enumerate(paths)))}
        source_ids = np.asarray([index[s] for s in cols["source"]], dtype=np.int64)
    row_ids = np.asarray(cols["row"], dtype=np.int64)
    parts = [train]
    for i, path in enumerate(paths):
        rows = row_ids[source_ids == i]
        if not len(rows):
            continue
        raw, origins = augment_file_rows(
            load_rows(path), rows.tolist(), texts_of(i), augmenter, i, path, report
        )
        if not len(raw):
            continue
        encoded = encode(raw, i).remove_columns(["source", "row"])
        encoded = encoded.add_column("source", [path + AUGMENTED] * len(encoded))
        encoded = encoded.add_column("row", origins)
        if SOURCE in train.column_names:
            encoded = encoded.add_column(SOURCE, np.full(len(encoded), i, dtype=np.int32))
        parts.append(encoded.select_columns(train.column_names).cast(train.features))
    return (concatenate_datasets(parts) if len(parts) > 1 else train), report
