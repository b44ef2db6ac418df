"""One rule for relative paths: written in a config file, against the file's folder;
given as a command-line override, against the working directory. `bigft config show`
states it and what parallel.strategy follows when the config leaves it unset."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from bigft.commands import app
from bigft.config import Config
from bigft.config_io import PATH_RULE, load_config
from bigft.errors import ConfigError


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(the config's folder, the working directory): two different folders."""
    conf, cwd = tmp_path / "conf", tmp_path / "work"
    conf.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return conf, cwd


def _write(conf: Path, **sections: Any) -> Path:
    config: dict[str, Any] = {
        "model": {"name_or_path": "some-org/some-model"},
        "data": {"train": "train.jsonl"},
        "output_dir": "out",
        **sections,
    }
    path = conf / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_output_dir_in_the_file_lands_next_to_the_config(layout: tuple[Path, Path]) -> None:
    conf, _ = layout
    cfg = load_config(_write(conf, output_dir="runs/x"))
    assert cfg.output_dir == str(conf / "runs" / "x")
    assert cfg.data.train == [str(conf / "train.jsonl")]  # not there yet: still that place
    # the config given by a relative path: the same folder
    assert load_config(Path("../conf/cfg.yaml")).output_dir == str(conf / "runs" / "x")


def test_an_override_lands_in_the_working_directory(layout: tuple[Path, Path]) -> None:
    conf, cwd = layout
    (cwd / "rows.jsonl").write_text("{}\n")
    path = _write(conf)
    cfg = load_config(path, ["output_dir=x", "data.train=rows.jsonl"])
    assert cfg.output_dir == str(cwd / "x")
    assert cfg.data.train == [str(cwd / "rows.jsonl")]
    merged = load_config(path, ["data={validation: val.jsonl}"])  # a mapping override
    assert merged.data.validation == str(cwd / "val.jsonl")
    assert merged.data.train == [str(conf / "train.jsonl")]  # still the file's


def test_a_data_file_only_in_the_working_directory_is_not_taken_from_there(
    layout: tuple[Path, Path],
) -> None:
    conf, cwd = layout
    (cwd / "train.jsonl").write_text("{}\n")
    path = _write(conf)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:2: data.train: {conf / 'train.jsonl'} does not exist")
    assert str(cwd / "train.jsonl") in message and "data.train=train.jsonl" in message
    # the same file beside the config is what is read
    (conf / "train.jsonl").write_text("{}\n")
    assert load_config(path).data.train == [str(conf / "train.jsonl")]


def test_mixture_sources_validation_and_test_follow_the_file(layout: tuple[Path, Path]) -> None:
    conf, cwd = layout
    (cwd / "b.jsonl").write_text("{}\n")
    data: dict[str, Any] = {
        "train": [{"path": "a.jsonl", "weight": 1}, {"path": "../shared/b.jsonl", "weight": 1}],
        "validation": "val.jsonl",
        "test": "hub:some/dataset",
    }
    cfg = load_config(_write(conf, data=data))
    assert cfg.data.train_files == [str(conf / "a.jsonl"), str(conf.parent / "shared/b.jsonl")]
    assert cfg.data.validation == str(conf / "val.jsonl")
    assert cfg.data.test == "hub:some/dataset"
    data["train"][0] = {"path": "b.jsonl", "name": "first", "weight": 1}  # only in the cwd
    with pytest.raises(ConfigError, match=r":\d+: data\.train: .*b\.jsonl does not exist"):
        load_config(_write(conf, data=data))


def test_models_are_folders_beside_the_config_or_hub_ids(layout: tuple[Path, Path]) -> None:
    conf, cwd = layout
    (conf / "models" / "base").mkdir(parents=True)
    model = {"name_or_path": "models/base", "tokenizer": "gpt2"}
    cfg = load_config(_write(conf, model=model, distill={"teacher": "../teachers/big"}))
    assert cfg.model.name_or_path == str(conf / "models" / "base")
    assert cfg.model.tokenizer == "gpt2"  # a hub id
    assert cfg.distill.teacher == str(conf.parent / "teachers" / "big")  # no hub id: a path
    assert load_config(_write(conf)).model.name_or_path == "some-org/some-model"
    # a folder of that name in the working directory only: named, not silently used
    (cwd / "some-org" / "some-model").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"model\.name_or_path: .*working directory"):
        load_config(_write(conf))
    cli = load_config(_write(conf), ["model.name_or_path=some-org/some-model"])
    assert cli.model.name_or_path == str(cwd / "some-org" / "some-model")


def test_every_other_path_key_follows_the_rule(layout: tuple[Path, Path]) -> None:
    conf, cwd = layout
    (conf / "zero.json").write_text("{}")
    sections = {
        "train": {"resume": "ckpt/step-00000004"},
        "parallel": {"deepspeed_config": "zero.json"},
        "data": {"train": "t.jsonl", "prepared_dir": "prepared"},
        "slurm": {"setup_script": "env.sh", "python": "python3", "accelerate_config": "zero3"},
    }
    cfg = load_config(_write(conf, **sections))
    assert cfg.train.resume == str(conf / "ckpt" / "step-00000004")
    assert cfg.parallel.deepspeed_config == str(conf / "zero.json")
    assert cfg.data.prepared_dir == str(conf / "prepared")
    assert cfg.slurm.setup_script == str(conf / "env.sh")
    assert cfg.slurm.python == "python3"  # a program on PATH
    assert cfg.slurm.accelerate_config == "zero3"  # a config bigft ships
    sections["slurm"] = {"python": ".venv/bin/python", "accelerate_config": "zero.json"}
    cfg = load_config(_write(conf, **sections), ["train.resume=ckpt/step-00000002"])
    assert cfg.slurm.python == str(conf / ".venv" / "bin" / "python")
    assert cfg.slurm.accelerate_config == str(conf / "zero.json")
    assert cfg.train.resume == str(cwd / "ckpt" / "step-00000002")
    assert load_config(_write(conf, **sections), ["train.resume=never"]).train.resume == "never"


def test_the_resolved_config_loads_the_same_from_anywhere(layout: tuple[Path, Path]) -> None:
    """A run's config.yaml (written where the run is) holds absolute paths."""
    conf, cwd = layout
    (conf / "train.jsonl").write_text("{}\n")
    cfg = load_config(_write(conf), ["output_dir=out"])
    copy = cwd / "out" / "config.yaml"
    copy.parent.mkdir()
    copy.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert load_config(copy) == cfg


def test_config_show_states_the_rule_and_absolute_paths(layout: tuple[Path, Path]) -> None:
    conf, cwd = layout
    path = _write(conf)
    result = CliRunner().invoke(app, ["config", "show", str(path), "train.resume=ck"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"# {PATH_RULE}."
    assert lines[1:3] == [f"# config file's folder: {conf}", f"# working directory: {cwd}"]
    assert f"output_dir: {conf / 'out'}" in lines
    assert f"  resume: {cwd / 'ck'}" in lines
    assert Config.model_validate(yaml.safe_load(result.stdout)) == load_config(
        path, ["train.resume=ck"]
    )


def test_config_show_says_an_unset_strategy_follows_the_launcher(
    layout: tuple[Path, Path],
) -> None:
    conf, _ = layout
    path = _write(conf)
    shown = CliRunner().invoke(app, ["config", "show", str(path)]).stdout
    [line] = [line for line in shown.splitlines() if line.startswith("  strategy:")]
    assert line.startswith("  strategy: ddp  # unset: the launcher decides; ")
    for part in ("zero1-3, fsdp2", "torchrun", "plain `bigft train` runs one process"):
        assert part in line
    chosen = CliRunner().invoke(app, ["config", "show", str(path), "parallel.strategy=ddp"])
    assert "  strategy: ddp\n" in chosen.stdout
    written = _write(conf, parallel={"strategy": "zero2"})
    assert "  strategy: zero2\n" in CliRunner().invoke(app, ["config", "show", str(written)]).stdout


def test_the_demo_paths_land_where_the_demo_says(
    layout: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bigft demo -o demo`: model and output under the working directory, data from the
    package (the demo config's own folder)."""
    import bigft.loop.train  # noqa: F401  (imported first: it binds the real setup)
    from bigft import demo

    _, cwd = layout
    made: list[Path] = []

    class Loaded(Exception):
        pass

    def fake_setup(cfg: Config, console: Any) -> None:
        raise Loaded(cfg)

    monkeypatch.setattr("bigft.tiny.save_tiny_base", lambda path, **_: made.append(path))
    monkeypatch.setattr("bigft.loop.setup.setup", fake_setup)
    with pytest.raises(Loaded) as caught:
        demo.run_demo(Path("demo"), [], Console(file=io.StringIO()))
    cfg = caught.value.args[0]
    assert made == [cwd / "demo" / "base-model"]
    assert cfg.model.name_or_path == str(cwd / "demo" / "base-model")
    assert cfg.output_dir == str(cwd / "demo")
    assert cfg.data.prepared_dir == str(cwd / "demo" / "prepared-data")
    assert cfg.data.train == [str(demo.DEMO_DIR / "train.jsonl")]
    assert cfg.data.test == str(demo.DEMO_DIR / "test.jsonl")
