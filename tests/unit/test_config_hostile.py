"""Config mistakes that used to pass silently or end in a traceback: duplicate YAML keys,
mapping overrides, non-finite and out-of-range numbers, prompt templates, scorers, config
files that are not UTF-8 YAML, `~` and over-long paths, and sweep grids."""

from __future__ import annotations

import codecs
import re
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from bigft.commands import app
from bigft.config import Config
from bigft.config_io import load_config
from bigft.config_yaml import user_overrides
from bigft.errors import ConfigError
from bigft.slurm import job as slurm_job
from bigft.slurm import sweep as slurm_sweep

# Line numbers below refer to this text.
BASE = """\
model:
  name_or_path: some/model
data:
  train: train.jsonl
train:
  seq_len: 128
  steps: 10
optim:
  lr: 1.0e-4
output_dir: runs/x
"""


def write(tmp_path: Path, text: str | bytes, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def error(path: Path, overrides: list[str] | None = None) -> str:
    """The one-line message load_config refuses the config with."""
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides or [])
    message = str(err.value)
    assert "\n" not in message, message
    return message


def numeric_fields() -> list[tuple[str, Any]]:
    """(dotted key, field info) of every int / float field of the config."""
    found: list[tuple[str, Any]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            members = set(get_args(ann)) if get_origin(ann) in (Union, type(int | None)) else {ann}
            if members & {int, float} and bool not in members:
                found.append((prefix + name, field))

    walk(Config, "")
    return found


def has_bound(field: Any, kinds: tuple[str, ...]) -> bool:
    return any(hasattr(m, k) for m in field.metadata for k in kinds)


NUMERIC = numeric_fields()
INTS = [k for k, f in NUMERIC if int in (set(get_args(f.annotation)) | {f.annotation})]
FLOATS = [k for k, f in NUMERIC if k not in INTS]


# ---------------------------------------------------------------------------------------
# Duplicate keys


def test_second_section_is_refused_with_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "train:\n  steps: 3\n")
    assert error(path) == f"{path}:11: train: duplicate key (first at line 5); merge the two"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            BASE.replace("  lr: 1.0e-4", "  lr: 1.0e-4\n  lr: 2.0e-4"),
            ":10: optim.lr: duplicate key (first at line 9); keep one",
        ),
        (
            BASE + "output_dir: runs/y\n",
            ":11: output_dir: duplicate key (first at line 10); keep one",
        ),
        (
            BASE + "eval: {every_steps: 1, every_steps: 2}\n",
            ":11: eval.every_steps: duplicate key (first at line 11); keep one",
        ),
        (
            BASE.replace(
                "  train: train.jsonl",
                "  train: a.jsonl\n  split:\n    train: 0.8\n    validation: 0.2\n    train: 0.9",
            ),
            ":8: data.split.train: duplicate key (first at line 6); keep one",
        ),
    ],
)
def test_duplicate_key_names_its_path_and_both_lines(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path, text)
    assert error(path) == f"{path}{expected}"


def test_merge_keys_may_be_overridden_but_not_repeated(tmp_path: Path) -> None:
    # `<<: {...}` brings defaults that the keys beside it replace: not a duplicate.
    merged = BASE.replace("train:\n  seq_len: 128\n", "train:\n  <<: {seq_len: 64, steps: 2}\n")
    cfg = load_config(write(tmp_path, merged))
    assert (cfg.train.seq_len, cfg.train.steps) == (64, 10)
    path = write(
        tmp_path, BASE.replace("  steps: 10\n", "  steps: 10\n  <<: {seq_len: 1}\n  steps: 11\n")
    )
    assert error(path) == f"{path}:9: train.steps: duplicate key (first at line 7); keep one"


def test_duplicate_key_inside_an_override_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    assert error(path, ["train={steps: 1, steps: 2}"]) == (
        "override 'train={steps: 1, steps: 2}': train.steps is given twice"
    )


def test_the_same_override_twice_can_be_refused() -> None:
    with pytest.raises(ConfigError, match=r"^command-line override optim\.lr is given twice"):
        user_overrides(["optim.lr=1e-4", "train.steps=2", "optim.lr=2e-4"])
    user_overrides(["train={steps: 2}", "train.seq_len=64"])  # merged, not repeated


# ---------------------------------------------------------------------------------------
# Mapping overrides


def test_mapping_override_merges_into_the_section(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    cfg = load_config(path, ["train={steps: 1}", "data={split: {train: 0.5, validation: 0.5}}"])
    assert (cfg.train.steps, cfg.train.seq_len) == (1, 128)
    assert cfg.data.train == [str(tmp_path / "train.jsonl")]
    assert (cfg.data.split.train, cfg.data.split.validation) == (0.5, 0.5)


@pytest.mark.parametrize("item", ["train=5", "train=null", "optim=adamw", "data.split=0.5"])
def test_a_value_over_a_section_is_blamed_on_the_override(tmp_path: Path, item: str) -> None:
    key, _, _ = item.partition("=")
    message = error(write(tmp_path, BASE), [item])
    assert message.startswith(f"command-line override {key}: a section, not a value (got ")
    assert f"set its keys ({key}.KEY=VALUE)" in message


def test_errors_in_a_merged_mapping_are_blamed_on_what_wrote_them(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    assert error(path, ["train={steps: 0}"]).startswith("command-line override train.steps: ")
    assert error(path, ["train={stepz: 3}"]) == (
        "command-line override train.stepz: unknown key; did you mean 'steps'?"
    )
    bad_file = write(tmp_path, BASE.replace("seq_len: 128", "seq_len: -1"))
    assert error(bad_file, ["train={steps: 2}"]).startswith(f"{bad_file}:6: train.seq_len: ")
    assert error(path, ["optim.betas=[.nan, 0.9]"]).startswith(
        "command-line override optim.betas.0: "
    )


def test_a_key_below_a_value_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    assert (
        error(path, ["train.seed.x=1"]) == "override 'train.seed.x=1': train.seed is not a section"
    )
    cfg = load_config(path, ["slurm.env.OMP_NUM_THREADS=4"])  # a free-form mapping
    assert cfg.slurm.env == {"OMP_NUM_THREADS": "4"}


# ---------------------------------------------------------------------------------------
# Numbers


def test_no_numeric_field_takes_a_negative_value(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    accepted = []
    for key, _ in NUMERIC:
        try:
            load_config(path, [f"{key}=-1"])
            accepted.append(key)
        except ConfigError as err:
            assert str(err).startswith(f"command-line override {key}: "), err
    assert accepted == []


@pytest.mark.parametrize(
    "key", [k for k, f in NUMERIC if k in INTS and not has_bound(f, ("le", "lt"))]
)
def test_integers_beyond_int64_are_refused(tmp_path: Path, key: str) -> None:
    message = error(write(tmp_path, BASE), [f"{key}={10**30}"])
    assert message == (
        f"command-line override {key}: must be at most 9223372036854775807 (a 64-bit integer) "
        f"(got {10**30})"
    )


@pytest.mark.parametrize("key", FLOATS)
@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf", "1e400"])
def test_non_finite_floats_are_refused(tmp_path: Path, key: str, value: str) -> None:
    message = error(write(tmp_path, BASE), [f"{key}={value}"])
    assert re.fullmatch(
        rf"command-line override {re.escape(key)}: Input should be a finite number \(got .*\)",
        message,
    )


@pytest.mark.parametrize("key", [k for k, _ in NUMERIC])
def test_booleans_are_not_numbers(tmp_path: Path, key: str) -> None:
    message = error(write(tmp_path, BASE), [f"{key}=true"])
    assert message == f"command-line override {key}: expected a number, not true/false (got True)"


def test_non_finite_number_in_the_file_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("lr: 1.0e-4", "lr: .inf"))
    assert error(path) == f"{path}:9: optim.lr: Input should be a finite number (got inf)"
    path = write(tmp_path, BASE.replace("seq_len: 128", "seq_len: 1000000000000000000000000000000"))
    assert error(path).startswith(f"{path}:6: train.seq_len: must be at most 9223372036854775807")


@pytest.mark.parametrize(
    ("betas", "bad"), [("[0.9, 1.0]", "betas[1] = 1.0"), ("[-0.1, 0.999]", "betas[0] = -0.1"),
                       ("[1.5, 0.999]", "betas[0] = 1.5")]
)  # fmt: skip
def test_adam_betas_lie_in_zero_one(tmp_path: Path, betas: str, bad: str) -> None:
    message = error(write(tmp_path, BASE), [f"optim.betas={betas}"])
    assert message == f"command-line override optim.betas: {bad} is outside [0, 1)"
    assert load_config(write(tmp_path, BASE), ["optim.betas=[0.0, 0.5]"]).optim.betas == (0.0, 0.5)


def test_seed_is_what_numpy_accepts(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    assert "greater than or equal to 0" in error(path, ["train.seed=-1"])
    assert "less than 4294967296" in error(path, [f"train.seed={2**32}"])
    assert load_config(path, [f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1


def test_warmup_longer_than_the_run_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    assert error(path, ["schedule.warmup_steps=11"]) == (
        "command-line override schedule.warmup_steps: 11 warmup steps in a run of 10 "
        "(train.steps); lower it, or use schedule.warmup_ratio"
    )
    in_file = write(tmp_path, BASE + "schedule:\n  warmup_steps: 20\n")
    assert error(in_file).startswith(f"{in_file}:12: schedule.warmup_steps: 20 warmup steps")
    assert load_config(path, ["schedule.warmup_steps=10"]).schedule.warmup_steps == 10
    # An epoch-based run learns its length at setup: the scheduler checks it then.
    assert load_config(path, ["train.steps=null", "schedule.warmup_steps=10000"])


def test_scheduler_refuses_warmup_longer_than_the_run() -> None:
    import torch

    from bigft.config import ScheduleConfig
    from bigft.optim import build_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError) as err:
        build_scheduler(optimizer, ScheduleConfig(warmup_steps=11), total_steps=10)
    assert str(err.value) == (
        "schedule.warmup_steps: 11 warmup steps in a run of 10 optimizer steps; lower it, "
        "or use schedule.warmup_ratio"
    )
    build_scheduler(optimizer, ScheduleConfig(name="constant", warmup_steps=10), total_steps=10)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 11)


# ---------------------------------------------------------------------------------------
# Prompt templates and scorers


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{instruction} {foo}\n{input}", r"placeholder \{foo\}; the placeholders are \{inst"),
        ("{0}: {instruction}", r"unknown placeholder \{0\}"),
        ("{}: {instruction}", r"unknown placeholder \{\}"),
        ("{instruction.upper}", r"unknown placeholder \{instruction\.upper\}"),
        ("{instruction", r"malformed template: expected '\}' before end of string"),
        ("{instruction} }", r"malformed template: single '\}' encountered"),
        ("{instruction!r}", r"write the placeholder as plain \{instruction\}"),
        ("{instruction:>9}", r"write the placeholder as plain \{instruction\}"),
        ("Answer:", r"a custom template needs an \{instruction\} placeholder"),
        ("alpca", r"did you mean 'alpaca'\? a custom template needs"),
    ],
)  # fmt: skip
def test_prompt_template_placeholders(tmp_path: Path, template: str, expected: str) -> None:
    message = error(write(tmp_path, BASE), [f"data.prompt_template={template!r}"])
    assert message.startswith("command-line override data.prompt_template: "), message
    assert re.search(expected, message), message


def test_prompt_templates_that_are_fine(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    assert "{foo}" in error(path, ["data.prompt_template='Q: {foo} {instruction}'"])
    for template in (
        "alpaca",
        "short",
        "{instruction}\n{input}\n",
        'JSON {{"a": 1}} {instruction}',
    ):
        assert load_config(path, [f"data.prompt_template={template!r}"])
    # Text rows never use the template: only its placeholders are checked there.
    assert load_config(path, ["data.format=text", "data.prompt_template='Answer:'"])


@pytest.mark.parametrize("spec", ["json.dumps", "json:", ":dumps", "my-mod:f", "json:dumps:x"])
def test_scorer_must_be_module_colon_function(tmp_path: Path, spec: str) -> None:
    message = error(write(tmp_path, BASE), [f"eval.scorer={spec}", "eval.generate.enabled=true"])
    assert message == (
        "command-line override eval.scorer: write it as 'module:function', e.g. "
        f"'my_metrics:score' (got {spec!r})"
    )


TOO_MANY = "too many positional arguments"
MISSING = "missing a required argument: 'extra'"
SCORERS = """\
def two(predictions, references):
    return {}

def one(predictions):
    return {}

def keywords(*, predictions, references):
    return {}

def three(predictions, references, extra):
    return {}

def flexible(*args, **kwargs):
    return {}

class Score:
    def __init__(self, predictions, references):
        pass
"""


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("one", "cannot be called as one(predictions, references): " + TOO_MANY),
        ("keywords", "cannot be called as keywords(predictions, references): " + TOO_MANY),
        ("three", "cannot be called as three(predictions, references): " + MISSING),
        ("Score", "is a class; name a function"),
    ],
)  # fmt: skip
def test_scorer_must_take_predictions_and_references(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, expected: str
) -> None:
    from bigft.eval.metrics import load_scorer

    module = f"scorers_{name.lower()}"
    (tmp_path / f"{module}.py").write_text(SCORERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as err:
        load_scorer(f"{module}:{name}")
    assert str(err.value) == f"eval.scorer: '{module}:{name}' {expected}"
    assert load_scorer(f"{module}:two").__name__ == "two"
    assert load_scorer(f"{module}:flexible").__name__ == "flexible"


def test_scorer_checks_library_functions_and_failing_imports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bigft.eval.metrics import load_scorer

    with pytest.raises(ConfigError, match=r"^eval\.scorer: 'os:getcwd' cannot be called as "):
        load_scorer("os:getcwd")
    (tmp_path / "scorers_boom.py").write_text("raise RuntimeError('boom\\nsecond line')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as err:
        load_scorer("scorers_boom:score")
    assert str(err.value) == (
        "eval.scorer: importing 'scorers_boom' failed: RuntimeError: boom second line"
    )


# ---------------------------------------------------------------------------------------
# Config files that are not UTF-8 YAML


@pytest.mark.parametrize(
    ("encoding", "name"),
    [("utf-16", "UTF-16"), ("utf-16-be", "UTF-16"), ("utf-32", "UTF-32")],
)
def test_wide_unicode_config_is_refused(tmp_path: Path, encoding: str, name: str) -> None:
    bom = {"utf-16-be": codecs.BOM_UTF16_BE}.get(encoding, b"")
    path = write(tmp_path, bom + BASE.encode(encoding))
    assert error(path) == f"{path}: the file is {name} text; save it as UTF-8"
    # A UTF-8 byte-order mark is simply skipped.
    assert (
        load_config(write(tmp_path, codecs.BOM_UTF8 + BASE.encode(), "bom.yaml")).train.steps == 10
    )


def test_non_utf8_config_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("runs/x", "runs/caf\xe9").encode("latin-1"))
    assert error(path) == f"{path}:10: not UTF-8 text (byte 0xe9); save the file as UTF-8"


def test_binary_config_is_refused_in_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.encode() + bytes(range(256)))
    assert error(path) == (
        f"{path}:11: invalid YAML: a NUL byte (a binary file, or UTF-16/32 text?); save the "
        "config as UTF-8 text"
    )
    path = write(tmp_path, BASE + "\x01\n", "ctrl.yaml")
    assert error(path) == (
        f"{path}:11: character U+0001 is not allowed in YAML (a control character: is this a "
        "binary file?)"
    )
    result = CliRunner().invoke(app, ["train", str(path), f"output_dir={tmp_path / 'out'}"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: {error(path)}"]
    assert not (tmp_path / "out").exists()


def test_config_path_that_is_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    path = tmp_path / "configs"
    assert error(path) == f"{path}: is a directory; give the YAML config file itself"
    assert error(Path("/dev/null")) == "/dev/null: not a regular file; give a YAML config file"
    assert error(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: config file not found"


def test_absurdly_nested_yaml_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "x: " + "[" * 5000 + "]" * 5000 + "\n")
    assert error(path) == f"{path}: invalid YAML: nested too deeply"


# ---------------------------------------------------------------------------------------
# Paths: `~`, over-long names


def test_tilde_is_the_home_directory_in_every_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    (tmp_path / "teacher").mkdir()
    text = """\
model: {name_or_path: ~/models/base, tokenizer: ~/models/tok}
data: {train: ~/data/train.jsonl, validation: ~/data/val.jsonl, test: ~/data/test.jsonl}
distill: {teacher: teacher}
train: {resume: ~/ckpt/step-1}
parallel: {deepspeed_config: ~/ds.json}
slurm: {setup_script: ~/env.sh}
output_dir: ~/runs/x
"""
    path = write(tmp_path, text)
    cfg = load_config(path)
    assert (cfg.model.name_or_path, cfg.model.tokenizer) == (
        str(home / "models/base"),
        str(home / "models/tok"),
    )
    assert cfg.data.train == [str(home / "data/train.jsonl")]
    assert (cfg.data.validation, cfg.data.test) == (
        str(home / "data/val.jsonl"),
        str(home / "data/test.jsonl"),
    )
    # A teacher directory is found beside the config, like model.name_or_path.
    assert cfg.distill.teacher == str(tmp_path / "teacher")
    assert cfg.train.resume == str(home / "ckpt/step-1")
    assert cfg.parallel.deepspeed_config == str(home / "ds.json")
    assert cfg.slurm.setup_script == str(home / "env.sh")
    assert cfg.output_dir == str(home / "runs/x")
    assert load_config(path, ["output_dir=~/runs/y"]).output_dir == str(home / "runs/y")
    assert load_config(path, ["distill.teacher=~/t"]).distill.teacher == str(home / "t")
    # A Slurm job gets absolute paths: the home directory's, not ./~ under the cwd.
    assert slurm_job.load_job_config(path, []).output_dir == str((home / "runs/x").resolve())


@pytest.mark.parametrize("key", ["output_dir", "data.train", "model.name_or_path"])
def test_path_component_longer_than_255_bytes(tmp_path: Path, key: str) -> None:
    long = "a" * 300
    message = error(write(tmp_path, BASE), [f"{key}=runs/{long}/x"])
    assert message.startswith(
        f"command-line override {key}: the path component '{'a' * 24}...' is 300 bytes long; "
        "file systems allow at most 255 per name (got 'runs/aaa"
    )


def test_output_dir_in_the_file_that_no_file_system_takes(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("runs/x", "é" * 130))
    assert error(path).startswith(f"{path}:10: output_dir: the path component 'éééé")
    assert "260 bytes long" in error(path)
    path = write(tmp_path, BASE.replace("runs/x", '"runs/\\0x"'))
    assert error(path) == f"{path}:10: output_dir: contains a NUL character (got 'runs/\\x00x')"
    path = write(tmp_path, BASE.replace("runs/x", '""'))
    assert error(path) == f"{path}:10: output_dir: is empty (got '')"
    path = write(tmp_path, BASE.replace("runs/x", "/".join(["b" * 200] * 21)))
    assert re.match(
        rf"{re.escape(str(path))}:10: output_dir: the path is 4220 bytes long", error(path)
    )


# ---------------------------------------------------------------------------------------
# Sweep grids


@pytest.mark.parametrize(
    ("grid", "expected"),
    [
        (["output_dir=a,b"], r"^--grid output_dir=a,b: each grid point already trains in its "),
        (["optim.lr=1e-4,1e-4"], r"^--grid optim\.lr=1e-4,1e-4: optim\.lr=1e-4 is listed twice; "),
        (["optim.lr=1e-4,0.0001"], r"optim\.lr=0\.0001 is listed twice \(1e-4 and 0\.0001 are "),
        (["train.seed=1,2", "optim.lr=1e-4", "train.seed=3"], r"^--grid train\.seed is given tw"),
        (["slurm.nodes=1,2"], r"^--grid slurm\.nodes=1,2: all grid points run in one Slurm job "),
    ],
)  # fmt: skip
def test_grid_mistakes(grid: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        slurm_sweep.expand_grid(grid)


def test_sweep_writes_nothing_for_a_bad_grid(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("runs/x", str(tmp_path / "sweep")))
    with pytest.raises(ConfigError, match=r"^--grid output_dir"):
        slurm_sweep.prepare_sweep(path, [], ["train.seed=1,2", "output_dir=a,b"], {})
    with pytest.raises(
        ConfigError, match=r"^command-line override optim\.lrr: unknown key; did you mean 'lr'\?$"
    ):
        slurm_sweep.prepare_sweep(path, [], ["optim.lrr=1e-4,2e-4"], {})
    assert not (tmp_path / "sweep").exists()
    _, n = slurm_sweep.prepare_sweep(path, [], ["train.seed=1,2", "optim.lr=1e-4,2e-4"], {})
    assert n == 4


@pytest.mark.parametrize("mem", ["abc", "4.5G", "-1", "480GB", "1 G"])
def test_slurm_mem_that_sbatch_refuses(tmp_path: Path, mem: str) -> None:
    message = error(write(tmp_path, BASE), [f"slurm.mem={mem}"])
    assert message.startswith("command-line override slurm.mem: not a memory size sbatch")


def test_slurm_mem_sbatch_accepts(tmp_path: Path) -> None:
    for mem in ("480G", "0", "64000", "2t"):
        assert load_config(write(tmp_path, BASE), [f"slurm.mem={mem}"]).slurm.mem == mem
