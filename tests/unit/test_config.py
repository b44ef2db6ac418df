"""Config: validation, 'did you mean', line numbers, overrides, resolved dump."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bigft.config import Config
from bigft.config_io import dump_config, load_config
from bigft.errors import ConfigError

BASE = """\
model:
  name_or_path: some/model
data:
  train: train.jsonl
train:
  seq_len: 128
  micro_batch_size: 2
optim:
  lr: 1.0e-4
output_dir: runs/x
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_and_types(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.train.micro_batch_size == 2
    assert cfg.data.format == "alpaca" and cfg.data.packing is True
    assert cfg.method.name == "full"
    assert cfg.data.split.train == pytest.approx(0.9)


def test_yaml_float_without_dot_is_converted(tmp_path: Path) -> None:
    # PyYAML reads `1e-4` as a string; the typed model must still give a float.
    cfg = load_config(write(tmp_path, BASE.replace("1.0e-4", "1e-4")))
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == pytest.approx(1e-4)


def test_unknown_key_names_line_and_nearest(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("  lr: 1.0e-4", "  lrr: 1.0e-4"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert f"{path}:9: optim.lrr: unknown key; did you mean 'lr'?" in msg


def test_unknown_section_suggests(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"cfg.yaml:\d+: optimizer: unknown key; did you mean 'optim'"
    ):
        load_config(write(tmp_path, BASE + "optimizer:\n  lr: 1\n"))


def test_wrong_type_names_key_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("seq_len: 128", "seq_len: long"))
    with pytest.raises(ConfigError, match=r"cfg.yaml:6: train.seq_len: .*integer.*'long'"):
        load_config(path)


def test_negative_lr(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"optim.lr: .*greater than 0"):
        load_config(write(tmp_path, BASE.replace("1.0e-4", "-1.0e-4")))


def test_split_must_sum_to_one(tmp_path: Path) -> None:
    text = BASE.replace(
        "  train: train.jsonl", "  train: train.jsonl\n  split: {train: 0.8, validation: 0.3}"
    )
    with pytest.raises(ConfigError, match="split ratios must sum to 1"):
        load_config(write(tmp_path, text))


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cfg.yaml:\d+: invalid YAML"):
        load_config(write(tmp_path, BASE + "train: [unclosed\n"))


def test_missing_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="output_dir: required key is missing"):
        load_config(write(tmp_path, BASE.replace("output_dir: runs/x\n", "")))


def test_overrides_are_typed_and_win(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, BASE),
        ["optim.lr=3e-4", "train.micro_batch_size=auto", "data.packing=false", "train.steps=7"],
    )
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.micro_batch_size == "auto"
    assert cfg.data.packing is False
    assert cfg.train.steps == 7


def test_override_typo_is_reported_as_override(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"command-line override optim.lrr: unknown key; did you mean 'lr'"
    ):
        load_config(write(tmp_path, BASE), ["optim.lrr=1"])


def test_malformed_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(write(tmp_path, BASE), ["optim.lr"])


def test_data_paths_resolve_against_config_dir(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text("{}\n")
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.data.train == [str(tmp_path / "train.jsonl")]


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE), ["optim.lr=5e-5"])
    again = Config.model_validate(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_every_field_is_documented() -> None:
    from pydantic import BaseModel

    missing = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(prefix + name)
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")

    walk(Config, "")
    assert missing == []
