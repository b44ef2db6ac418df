"""Bad data fails with one line naming the file, the line (or row) and the problem."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from datasets import Dataset

from bigft.config import DataConfig
from bigft.data import prepare_data
from bigft.data.sources import load_rows
from bigft.errors import DataError

DATA = Path(__file__).parents[1] / "assets" / "data"
ALL_TRAIN = {"train": 1.0, "validation": 0.0, "test": 0.0}


def error_of(tokenizer: Any, **data: Any) -> str:
    cfg = DataConfig(**{"split": ALL_TRAIN, **data})
    with pytest.raises(DataError) as info:
        prepare_data(cfg, tokenizer, 512, seed=0)
    message = str(info.value)
    assert "\n" not in message  # one line, no traceback for a user's mistake
    return message


def test_malformed_jsonl_names_the_line(tokenizer: Any) -> None:
    path = DATA / "bad_json.jsonl"  # line 2 is blank: lines, not rows, are counted
    assert (
        error_of(tokenizer, train=str(path))
        == f"{path}:4: not valid JSON (Expecting ',' delimiter)"
    )


def test_alpaca_row_without_output(tokenizer: Any) -> None:
    path = DATA / "alpaca_no_output.jsonl"
    assert error_of(tokenizer, train=str(path)) == f"{path}:4: alpaca row has no 'output' field"


def test_chat_unknown_role(tokenizer: Any) -> None:
    path = DATA / "chat_bad_role.jsonl"
    message = error_of(tokenizer, format="chat", train=str(path))
    assert message.startswith(f"{path}:2: messages[1] has unknown role 'bot'; valid roles: system")


def test_missing_and_empty_files(tokenizer: Any, tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    assert error_of(tokenizer, train=str(missing)).startswith(f"{missing}: data file not found")
    empty = DATA / "empty.jsonl"
    assert error_of(tokenizer, train=str(empty)) == f"{empty}: file has no rows"
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")
    assert error_of(tokenizer, train=str(blank)) == f"{blank}: file has no rows"
    header_only = tmp_path / "h.csv"
    header_only.write_text("instruction,output\n")
    assert error_of(tokenizer, train=str(header_only)).startswith(
        f"{header_only}: file has no rows"
    )


def test_unknown_extension_lists_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError, match=r"unsupported data file type '\.txt'; supported: \.jsonl"):
        load_rows(str(path))


def test_json_array_syntax_error_names_the_line(tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(
        '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output"}\n]\n'
    )
    assert error_of(tokenizer, train=str(path)).startswith(f"{path}:3: not valid JSON (")


def test_csv_and_parquet_rows_are_located(tokenizer: Any, tmp_path: Path) -> None:
    rows = [{"instruction": f"i{k}", "output": f"o{k}"} for k in range(4)]
    rows[2]["output"] = None  # type: ignore[assignment]
    Dataset.from_list(rows).to_csv(tmp_path / "d.csv", index=False)
    Dataset.from_list(rows).to_parquet(tmp_path / "d.parquet")
    csv_message = error_of(tokenizer, train=str(tmp_path / "d.csv"))
    assert csv_message == f"{tmp_path / 'd.csv'}:4: alpaca row has no 'output' field"  # header + 3
    parquet_message = error_of(tokenizer, train=str(tmp_path / "d.parquet"))
    assert parquet_message == f"{tmp_path / 'd.parquet'}[2]: alpaca row has no 'output' field"


def test_error_in_second_file_or_validation_file_names_that_file(
    tokenizer: Any, tmp_path: Path
) -> None:
    good = str(DATA / "alpaca.jsonl")
    bad = str(DATA / "alpaca_no_output.jsonl")
    assert error_of(tokenizer, train=[good, bad]).startswith(f"{bad}:4: ")
    assert error_of(tokenizer, train=good, validation=bad).startswith(f"{bad}:4: ")


def test_first_bad_row_is_found_with_several_processes(tokenizer: Any, tmp_path: Path) -> None:
    lines = [json.dumps({"instruction": f"i{k}", "output": f"o{k}"}) for k in range(12)]
    lines[9] = json.dumps({"output": "o9"})
    lines[11] = json.dumps({"instruction": "i11"})
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n")
    message = error_of(tokenizer, train=str(path), num_proc=2, cache=False)
    # Row 9 is in the second worker's shard and on line 11 (a blank line precedes it).
    assert message == f"{path}:11: alpaca row has no 'instruction' field"


def test_wrong_field_type(tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": ["x"], "output": "d"}\n')
    message = error_of(tokenizer, train=str(path))
    assert message.startswith(f"{path}:")


def test_hub_dataset_offline_is_a_clear_error() -> None:
    with pytest.raises(DataError, match=r"hub:someone/nothing: could not load hub dataset"):
        load_rows("hub:someone/nothing")


ROW = '{"instruction": "Résumé", "output": "ça va"}\n'  # valid UTF-8 with accents


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "latin1.jsonl",
            ROW.encode("latin-1"),
            r":1: not valid UTF-8 \(byte 0xe9\); convert the file to UTF-8 \(from Latin-1: "
            r"iconv -f LATIN1 -t UTF-8 latin1\.jsonl > latin1\.utf8\.jsonl\)$",
        ),
        (
            # one bad byte inside a JSON string on line 3; the lines before hold UTF-8 accents
            "string.jsonl",
            (ROW * 2).encode() + b'{"instruction": "caf\xe9", "output": "b"}\n' + ROW.encode(),
            r":3: not valid UTF-8 \(byte 0xe9\); convert the file to UTF-8",
        ),
        (
            "utf16.jsonl",
            (ROW * 2).encode("utf-16"),
            r": file is UTF-16 text \(it starts with a UTF-16 byte-order mark\); convert it "
            r"to UTF-8, e.g. iconv -f UTF-16 -t UTF-8 utf16\.jsonl > utf16\.utf8\.jsonl$",
        ),
        (
            "utf16le.jsonl",
            (ROW * 2).encode("utf-16-le"),
            r": file looks like UTF-16LE text \(every other byte is NUL\); convert it to UTF-8",
        ),
        (
            "binary.jsonl",
            bytes(range(256)) * 4,
            r": not a text file \(it holds NUL bytes\); data files are UTF-8 text: check that "
            r"this is the right file, or convert it to UTF-8$",
        ),
        (
            "latin1.csv",
            "instruction,output\nRésumé,ça\n".encode("latin-1"),
            r":2: not valid UTF-8 \(byte 0xe9\); convert the file to UTF-8",
        ),
        (
            "utf16.json",
            f"[{ROW.strip()}]".encode("utf-16"),
            r": file is UTF-16 text",
        ),
    ],
)
def test_file_that_is_not_utf8_is_named_with_its_line(
    tokenizer: Any, tmp_path: Path, name: str, content: bytes, expected: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    message = error_of(tokenizer, train=str(path))
    assert message.startswith(str(path)), message
    assert re.search(expected, message.removeprefix(str(path))), message


def test_utf8_check_finds_the_line_across_read_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A character split between two reads is valid; a bad byte is found on its line; a
    UTF-8 byte-order mark is fine."""
    from bigft.data import sources

    good = "a é 漢\n".encode() * 4
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (ROW * 2).encode())
    sources._check_utf8(path, str(path))
    assert load_rows(str(path))[1] == {"instruction": "Résumé", "output": "ça va"}
    for size in (1, 2, 3, 5):
        monkeypatch.setattr(sources, "_CHUNK_BYTES", size)
        path.write_bytes(good)
        sources._check_utf8(path, str(path))  # no error
        for pos in range(0, len(good) + 1, 3):
            path.write_bytes(good[:pos] + b"\xff" + good[pos:])
            line = good[:pos].count(b"\n") + 1
            with pytest.raises(DataError, match=rf":{line}: not valid UTF-8"):
                sources._check_utf8(path, str(path))
