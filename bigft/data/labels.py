"""Class names of labelled data (text or images), in id order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from datasets import Dataset

from bigft.config import DataConfig
from bigft.data.sources import load_rows
from bigft.errors import DataError


def label_names_from(cfg: DataConfig, read: Callable[[str], Dataset] = load_rows) -> list[str]:
    """The class names in id order: data.label_names, or the sorted distinct labels of the
    training files (integers sort numerically); `read` loads a file's raw rows."""
    if cfg.label_names is not None:
        if len(set(cfg.label_names)) != len(cfg.label_names) or len(cfg.label_names) < 2:
            raise DataError("data.label_names: list at least two distinct classes")
        return list(cfg.label_names)
    values: set[Any] = set()
    for path in cfg.train_files:
        rows = read(path)
        if cfg.label_field not in rows.column_names:
            raise DataError(f"{path}: rows have no '{cfg.label_field}' column (data.label_field)")
        values.update(v for v in rows[cfg.label_field] if v is not None)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        names = [str(v) for v in sorted(values)]
    else:
        names = sorted(str(v) for v in values)
    if len(names) < 2:
        raise DataError(
            f"{', '.join(cfg.train_files)}: the training rows hold {len(names)} distinct "
            f"label(s) in '{cfg.label_field}'; classification needs at least two"
        )
    return names


def map_checked(
    raw: Dataset,
    fn: Callable[[dict[str, list[Any]]], dict[str, list[Any]]],
    desc: str,
    where: Callable[[int], str],
) -> Dataset:
    """`raw` mapped by `fn` (batched), whose rows carry an `error` column: the first row
    with an error is a DataError naming its place (`where(index)`); otherwise the rows
    without that column."""
    out = raw.map(
        fn,
        batched=True,
        remove_columns=raw.column_names,
        load_from_cache_file=False,
        keep_in_memory=True,
        desc=desc,
    )
    errors = out["error"]
    bad = next((i for i, e in enumerate(errors) if e), None)
    if bad is not None:
        raise DataError(f"{where(bad)}: {errors[bad]}")
    return out.remove_columns("error")
