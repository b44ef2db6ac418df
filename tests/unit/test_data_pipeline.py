"""prepare_data: sources, cleaning (empty / duplicate / over-long), splits, statistics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from datasets import Dataset
from rich.console import Console

from bigft.config import DataConfig
from bigft.data import prepare_data
from bigft.data.formats import IGNORE_INDEX
from bigft.data.preview import preview
from bigft.errors import DataError

DATA = Path(__file__).parents[1] / "assets" / "data"
ALL_TRAIN = {"train": 1.0, "validation": 0.0, "test": 0.0}
# The filters that are off by default (tests/unit/test_data_clean.py) drop nothing.
NOTHING_ELSE = {"too_short": 0, "language": 0, "near_duplicate": 0}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def alpaca(i: int, output: str | None = None) -> dict[str, str]:
    return {"instruction": f"Task {i}.", "output": f"Answer {i}." if output is None else output}


def rows_of(ds: Dataset | None) -> set[tuple[int, ...]]:
    assert ds is not None
    return {tuple(ids) for ids in ds["input_ids"]}


def test_cleaning_counts_and_drops_duplicates_empty_and_overlong(
    tmp_path: Path, tokenizer: Any
) -> None:
    rows = [alpaca(i) for i in range(20)]
    rows += [alpaca(3), alpaca(7), alpaca(7)]  # 3 exact duplicates
    rows += [alpaca(100, output=""), alpaca(101, output="   ")]  # 2 empty responses
    rows += [alpaca(200, output="x" * 120), alpaca(201, output="y" * 150)]  # 2 over-long
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(train=path, prompt_template="short", split=ALL_TRAIN, overlong="drop")
    seq_len = 80  # normal rows are ~50 tokens

    dropped = prepare_data(cfg, tokenizer, seq_len, seed=0)
    stats = dropped.stats.splits["train"]
    assert (stats.rows_loaded, stats.rows_kept) == (27, 20)
    assert stats.dropped == {"empty": 2, "duplicate": 3, "too_long": 2} | NOTHING_ELSE
    assert stats.truncated == 0
    assert len(dropped.train) == 20 and len(rows_of(dropped.train)) == 20
    assert dropped.validation is None and dropped.test is None
    assert dropped.train.column_names == ["input_ids", "labels"]
    assert stats.length_max <= seq_len
    assert stats.target_tokens == sum(
        sum(label != IGNORE_INDEX for label in labels) for labels in dropped.train["labels"]
    )

    cfg.overlong = "truncate"
    truncated = prepare_data(cfg, tokenizer, seq_len, seed=0)
    stats = truncated.stats.splits["train"]
    assert stats.rows_kept == 22 and stats.truncated == 2
    assert stats.dropped == {"empty": 2, "duplicate": 3, "too_long": 0} | NOTHING_ELSE
    assert max(len(ids) for ids in truncated.train["input_ids"]) == seq_len == stats.length_max

    cfg.drop_duplicates = False
    kept = prepare_data(cfg, tokenizer, seq_len, seed=0)
    assert kept.stats.splits["train"].rows_kept == 25


def test_truncation_that_leaves_no_target_drops_the_row(tmp_path: Path, tokenizer: Any) -> None:
    rows = [alpaca(1), {"instruction": "long " * 40, "output": "z"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(train=path, prompt_template="short", split=ALL_TRAIN)
    stats = prepare_data(cfg, tokenizer, 80, seed=0).stats.splits["train"]
    assert stats.rows_kept == 1 and stats.dropped["too_long"] == 1


def test_ratio_split_sizes_are_exact_deterministic_and_disjoint(
    tmp_path: Path, tokenizer: Any
) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"document number {i}"} for i in range(100)])
    cfg = DataConfig(
        format="text", train=path, split={"train": 0.8, "validation": 0.1, "test": 0.1}
    )
    a = prepare_data(cfg, tokenizer, 64, seed=1)
    b = prepare_data(cfg, tokenizer, 64, seed=1)
    c = prepare_data(cfg, tokenizer, 64, seed=2)
    assert (len(a.train), len(a.validation or []), len(a.test or [])) == (80, 10, 10)
    for part in ("train", "validation", "test"):
        assert getattr(a, part)["input_ids"] == getattr(b, part)["input_ids"]
    assert rows_of(a.validation) != rows_of(c.validation)
    train, val, test = rows_of(a.train), rows_of(a.validation), rows_of(a.test)
    assert not (train & val or train & test or val & test)
    assert len(train | val | test) == 100
    assert a.stats.splits["validation"].source == "10% of train"


def test_separate_validation_file_wins_and_duplicates_of_train_leave_it(
    tmp_path: Path, tokenizer: Any
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [alpaca(i) for i in range(40)])
    val = write_jsonl(tmp_path / "val.jsonl", [alpaca(1000), alpaca(1001), alpaca(5)])
    cfg = DataConfig(
        train=train, validation=val, split={"train": 0.8, "validation": 0.1, "test": 0.1}
    )
    prepared = prepare_data(cfg, tokenizer, 512, seed=0)
    assert len(prepared.test or []) == 4  # test still split off train: 10% of 40
    assert len(prepared.train) == 36  # validation's ratio is not taken from train
    stats = prepared.stats.splits["validation"]
    assert stats.source == val
    assert (stats.rows_loaded, stats.rows_kept, stats.dropped["duplicate"]) == (3, 2, 1)


def test_several_train_files_csv_parquet_and_saved_dataset(tmp_path: Path, tokenizer: Any) -> None:
    rows = [alpaca(i) for i in range(6)]
    Dataset.from_list(rows[:2]).to_csv(tmp_path / "a.csv", index=False)
    Dataset.from_list(rows[2:4]).to_parquet(tmp_path / "b.parquet")
    Dataset.from_list(rows[4:]).save_to_disk(tmp_path / "saved")
    files = [str(tmp_path / "a.csv"), str(tmp_path / "b.parquet"), str(tmp_path / "saved")]
    cfg = DataConfig(train=files, split=ALL_TRAIN, packing=True, num_proc=2, cache=False)
    prepared = prepare_data(cfg, tokenizer, 320, seed=0)
    assert len(prepared.train) == 6
    stats = prepared.stats
    assert stats.splits["train"].length_max == 158
    assert stats.packed_rows == 3  # six 158-token rows, two per 320-token row
    assert stats.packing_efficiency == pytest.approx(6 * 158 / (3 * 320))


def test_cached_tokenization_gives_the_same_rows(tmp_path: Path, tokenizer: Any) -> None:
    """The map fingerprint (tokenizer, settings) is stable, so datasets reuses its cache."""
    cfg = DataConfig(format="chat", train=str(DATA / "chat_messages.jsonl"), split=ALL_TRAIN)
    first = prepare_data(cfg, tokenizer, 256, seed=0)
    second = prepare_data(cfg, tokenizer, 256, seed=0)
    assert first.train["input_ids"] == second.train["input_ids"]
    assert first.train.cache_files and first.train.cache_files == second.train.cache_files


def test_no_training_row_left_is_an_error(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [alpaca(1, output=""), alpaca(2, output=" ")])
    cfg = DataConfig(train=path, split=ALL_TRAIN)
    with pytest.raises(DataError, match=r"train.jsonl: no training rows left .*empty 2"):
        prepare_data(cfg, tokenizer, 512, seed=0)


def test_preview_shows_masked_and_trained_spans(tokenizer: Any) -> None:
    cfg = DataConfig(train=str(DATA / "alpaca.jsonl"), prompt_template="short", split=ALL_TRAIN)
    prepared = prepare_data(cfg, tokenizer, 512, seed=0)
    console = Console(record=True, width=200, force_terminal=True, color_system="truecolor")
    preview(prepared, tokenizer, console, n=1)
    text = console.export_text(clear=False)
    assert "### Instruction:\nAdd the numbers." in text and "5</s>" in text
    assert "duplicate" in text and "packing" in text
    ansi = console.export_text(styles=True)
    # The prompt is dim grey, the answer (with its eos) bold green.
    assert "\x1b[2;90m### Response:" in ansi and "\x1b[1;32m5</s>" in ansi


def test_exact_duplicates_remember_only_repeated_digests() -> None:
    """Across splits in cleaning order, a row equal to a kept row is a duplicate; only
    digests that occur more than once are kept in memory."""
    from datasets import Dataset

    from bigft.data.dedup import ExactDuplicates

    def digests(values: list[int]) -> Dataset:
        return Dataset.from_dict({"digest": [v.to_bytes(16, "little") for v in values]})

    train = [*range(1000), 7, 7, 999]  # 7 three times, 999 twice
    validation = [5, 2000, 2001, 2000]  # 5 repeats a train row; 2000 repeats itself
    seen = ExactDuplicates([digests(train), digests(validation)])
    duplicates = []
    for i in range(len(train)):
        if i in seen:
            duplicates.append(i)
        elif i != 999:  # row 999 is dropped for another reason: its copy is not a duplicate
            seen.add(i)
    assert duplicates == [1000, 1001]  # the copies of row 7; row 1002 (999) is kept
    seen.next_split()
    found = [i for i in range(len(validation)) if i in seen or seen.add(i)]
    assert found == [0, 3]
    assert len(seen._kept) == 4  # 5, 7, 999 and 2000: not the 1,000 distinct rows


def test_a_data_file_is_never_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checking a file (empty? UTF-8?) reads it in chunks: the memory of `bigft data
    prepare` does not grow with the size of its input files."""
    from bigft.data.sources import load_rows
    from bigft.errors import DataError

    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "x" * 100}] * 2000)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n" * 1000)

    def guarded(read: Any) -> Any:
        def whole(self: Path, *args: Any, **kwargs: Any) -> Any:
            if self.name in ("rows.jsonl", "blank.jsonl"):
                raise AssertionError(f"{self} was read whole")
            return read(self, *args, **kwargs)

        return whole

    monkeypatch.setattr(Path, "read_bytes", guarded(Path.read_bytes))
    monkeypatch.setattr(Path, "read_text", guarded(Path.read_text))
    assert len(load_rows(str(path))) == 2000
    with pytest.raises(DataError, match="file has no rows"):
        load_rows(str(blank))
