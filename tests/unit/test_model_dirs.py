"""Broken model directories and a train.seq_len the model cannot hold: one line naming the
config key and the file, exit 2, nothing written."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bigft.commands import app
from bigft.config import ModelConfig
from bigft.errors import ModelError
from bigft.model.load import load_model, load_tokenizer
from tests.helpers import alpaca_rows, write_config, write_jsonl


def _truncate(file: Path, size: int) -> None:
    with file.open("r+b") as fh:
        fh.truncate(size)


def _no_tokenizer(path: Path) -> None:
    for file in path.glob("tokenizer*"):
        file.unlink()


# damage done to a copy of the tiny base -> what the one line must say
BROKEN: dict[str, tuple[Callable[[Path], object], str]] = {
    "empty weights": (
        lambda p: _truncate(p / "model.safetensors", 0),
        r"model\.safetensors is empty \(0 bytes\); copy or download the model again",
    ),
    "truncated weights": (
        lambda p: _truncate(p / "model.safetensors", 4096),
        r"model\.safetensors is truncated \(4096 bytes; its header declares \d+\); copy or "
        r"download",
    ),
    "no tokenizer": (
        _no_tokenizer,
        r"holds no tokenizer \(no tokenizer\.json, .*\); set model\.tokenizer to",
    ),
    "broken config.json": (
        lambda p: (p / "config.json").write_text('{"model_type": "llama", '),
        r"config\.json is not valid JSON \(.*line 1 column \d+.*\); restore it",
    ),
    "no config.json": (
        lambda p: (p / "config.json").unlink(),
        r"has no config\.json; give a directory written by save_pretrained",
    ),
    "no weights": (
        lambda p: (p / "model.safetensors").unlink(),
        r"holds no weights \(model\.safetensors\)",
    ),
    "not found": (
        shutil.rmtree,
        r"directory not found; check the path",
    ),
}


@pytest.fixture
def broken_copy(tiny_base: Path, tmp_path: Path) -> Callable[[str], Path]:
    def make(case: str) -> Path:
        path = tmp_path / "model"
        shutil.copytree(tiny_base, path)
        BROKEN[case][0](path)
        return path

    return make


@pytest.fixture
def config_file(tiny_base: Path, tmp_path: Path) -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(32))
    return write_config(tmp_path / "cfg.yaml", tiny_base, data, train={"steps": 2})


def one_line(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_model_dir_is_one_line_naming_the_file(
    case: str, broken_copy: Callable[[str], Path], config_file: Path
) -> None:
    path = broken_copy(case)
    out = config_file.parent / "out"
    line = one_line(["train", str(config_file), f"model.name_or_path={path}"])
    assert line.startswith(f"error: model.name_or_path '{path}'"), line
    assert re.search(BROKEN[case][1], line), line
    assert "cannot load tokenizer" not in line  # the tokenizer is not blamed
    assert not out.exists()


@pytest.mark.parametrize("case", ["broken config.json", "truncated weights", "not found"])
def test_broken_teacher_is_blamed_on_distill_teacher_before_any_write(
    case: str, broken_copy: Callable[[str], Path], config_file: Path
) -> None:
    path = broken_copy(case)
    out = config_file.parent / "out"
    line = one_line(["train", str(config_file), f"distill.teacher={path}"])
    assert line.startswith(f"error: distill.teacher '{path}'"), line
    assert re.search(BROKEN[case][1], line), line
    assert not out.exists()


def test_teacher_of_an_unknown_architecture_fails_before_any_write(
    tiny_base: Path, config_file: Path, tmp_path: Path
) -> None:
    """A config.json transformers cannot build: refused with the teacher's key before the
    run directory is claimed (the teacher itself loads only after the student)."""
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_base, teacher)
    (teacher / "config.json").write_text('{"model_type": "no-such-architecture"}')
    line = one_line(["train", str(config_file), f"distill.teacher={teacher}"])
    assert line.startswith(f"error: distill.teacher: cannot load model '{teacher}'"), line
    assert not (config_file.parent / "out").exists()


def test_load_functions_check_the_directory_first(
    broken_copy: Callable[[str], Path],
) -> None:
    """Direct callers get the same errors: the tokenizer loader reads config.json first."""
    path = broken_copy("broken config.json")
    with pytest.raises(ModelError, match=r"^model\.name_or_path '.*': config\.json is not valid"):
        load_tokenizer(ModelConfig(name_or_path=str(path)))
    (path / "config.json").unlink()
    with pytest.raises(ModelError, match=r"^model\.name_or_path '.*' has no config\.json"):
        load_model(ModelConfig(name_or_path=str(path)))


def test_tokenizer_from_another_directory_is_fine(
    broken_copy: Callable[[str], Path], tiny_base: Path
) -> None:
    path = broken_copy("no tokenizer")
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(path), tokenizer=str(tiny_base)))
    assert tokenizer.pad_token_id is not None
    with pytest.raises(ModelError, match=r"^model\.tokenizer '.*' holds no tokenizer"):
        load_tokenizer(ModelConfig(name_or_path=str(tiny_base), tokenizer=str(path)))


def test_safetensors_check_reads_the_header_only(tiny_base: Path, tmp_path: Path) -> None:
    from bigft.model.checks import safetensors_problem

    good = tiny_base / "model.safetensors"
    assert safetensors_problem(good) is None
    grown = tmp_path / "grown.safetensors"
    grown.write_bytes(good.read_bytes() + b"\0")
    assert "grown.safetensors is corrupt" in str(safetensors_problem(grown))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\0\0\0\0\0\0\0not json at all!")
    assert "header is not valid JSON" in str(safetensors_problem(garbage))


# ---------------------------------------------------------------------------------------
# train.seq_len against the model's positions.


def test_seq_len_beyond_the_model_is_refused(config_file: Path, tiny_base: Path) -> None:
    # unpacked, the rows are far shorter than 2048: only the model's limit is wrong
    line = one_line(["train", str(config_file), "train.seq_len=2048", "data.packing=false"])
    assert re.search(
        rf"train\.seq_len 2048 is longer than model '{re.escape(str(tiny_base))}' supports: "
        r"1024 positions \(max_position_embeddings in its config\.json\); lower "
        r"train\.seq_len to 1024 or less, or .*rope scaling",
        line,
    ), line
    assert not (config_file.parent / "out").exists()


def test_context_limit_counts_rope_scaling() -> None:
    from transformers import BertConfig, GPT2Config, LlamaConfig

    from bigft.model.checks import context_limit

    assert context_limit(LlamaConfig(max_position_embeddings=1024)) == (
        1024,
        "max_position_embeddings",
    )
    linear = LlamaConfig(
        max_position_embeddings=1024, rope_scaling={"rope_type": "linear", "factor": 4.0}
    )
    assert context_limit(linear) == (4096, "max_position_embeddings 1024 x rope factor 4.0")
    # llama3 and yarn with the stretched length already stated: taken as stated
    llama3 = LlamaConfig(
        max_position_embeddings=131072,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "original_max_position_embeddings": 8192,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
    )
    assert context_limit(llama3) == (131072, "max_position_embeddings")
    assert context_limit(GPT2Config(n_positions=512))[0] == 512  # type: ignore[index]
    assert context_limit(BertConfig(max_position_embeddings=512))[0] == 512  # type: ignore[index]
