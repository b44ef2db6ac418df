"""`bigft eval` on a run directory, on its exported model or adapter, and on a bare model
directory: the scores of `--data FILE` equal the run's own final evaluation of the same
rows, for full and LoRA runs and every task, and no temporary directory is left behind."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from bigft.commands import app
from bigft.config_io import load_config
from bigft.loop.setup import setup
from bigft.loop.train import train
from tests.helpers import alpaca_rows, write_config, write_jsonl
from tests.integration.test_tasks import labelled_rows

# The model-directory form knows nothing of the run: it is told the run's data settings.
SAME_DATA = ["data.prompt_template=short", "train.seq_len=128"]


@pytest.fixture
def tmpdir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """TMPDIR for this test only (tempfile caches its directory: forget it)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)
    return scratch


def make_run(root: Path, tiny_base: Path, task: str, method: str) -> tuple[Path, Path, dict]:
    """A 3-step run scored at the end on its own validation file; (run dir, that file,
    the run's summary)."""
    if task == "causal_lm":
        train_rows, val_rows = alpaca_rows(48, seed=0), alpaca_rows(24, seed=1)
        seen = {json.dumps(r, sort_keys=True) for r in train_rows}
        # validation rows that repeat a training row would be dropped from validation
        val_rows = [r for r in val_rows if json.dumps(r, sort_keys=True) not in seen]
        data: dict[str, Any] = {"prompt_template": "short"}
    else:
        train_rows, val_rows = labelled_rows(48, seed=0), labelled_rows(24, seed=1)
        data = {"label_field": "share" if task == "regression" else "label"}
    data["train"] = str(write_jsonl(root / "train.jsonl", train_rows))
    data["validation"] = str(write_jsonl(root / "val.jsonl", val_rows))
    path = write_config(
        root / "cfg.yaml",
        tiny_base,
        Path(data["train"]),
        task=task,
        method={"name": method},
        train={"seq_len": 128, "micro_batch_size": 4, "steps": 3},
    )
    config = yaml.safe_load(path.read_text())
    config["data"] = data
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(path)
    summary = train(setup(cfg))
    return Path(cfg.output_dir), Path(data["validation"]), summary


def bigft_eval(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(app, ["eval", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_same_scores(got: dict[str, Any], expected: dict[str, Any]) -> None:
    keys = [k for k, v in expected.items() if isinstance(v, int | float)]
    assert keys and set(keys) <= set(got), (got, expected)
    for key in keys:
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("method", ["full", "lora"])
def test_causal_lm_run_and_model_dir_score_the_file(
    tiny_base: Path, tmp_path: Path, tmpdir_env: Path, method: str
) -> None:
    run_dir, val_file, summary = make_run(tmp_path, tiny_base, "causal_lm", method)
    final = run_dir / "final"
    adapter = method == "lora"
    assert (final / "adapter_config.json").is_file() == adapter
    expected = summary["validation"]
    assert expected["eval_tokens"] > 100

    # RUN --data FILE: every row of FILE is scored, none dropped as a "duplicate of train"
    assert_same_scores(bigft_eval(str(run_dir), "--data", str(val_file))["test"], expected)
    # RUN alone: the run's own validation split
    assert_same_scores(bigft_eval(str(run_dir))["validation"], expected)
    # RUN/final --data FILE: the full model, or the adapter on the run's base
    scored = bigft_eval(str(final), "--data", str(val_file), *SAME_DATA)["test"]
    assert_same_scores(scored, expected)
    if adapter:
        # an adapter directory outside its run: the base comes from adapter_config.json
        alone = tmp_path / "adapter-copy"
        shutil.copytree(final, alone)
        scored = bigft_eval(str(alone), "--data", str(val_file), *SAME_DATA)["test"]
        assert_same_scores(scored, expected)
    assert not list(tmpdir_env.glob("bigft-eval-*"))


@pytest.mark.parametrize(("task", "method"), [("classification", "lora"), ("regression", "full")])
def test_labelled_tasks_score_the_file(
    tiny_base: Path, tmp_path: Path, tmpdir_env: Path, task: str, method: str
) -> None:
    run_dir, val_file, summary = make_run(tmp_path, tiny_base, task, method)
    expected = summary["validation"]
    assert_same_scores(bigft_eval(str(run_dir), "--data", str(val_file))["test"], expected)
    label = ["data.label_field=share"] if task == "regression" else []
    model = bigft_eval(str(run_dir / "final"), "--data", str(val_file), "--task", task, *label)
    assert_same_scores(model["test"], expected)
    if task == "classification":
        assert model["test"]["confusion_matrix"] == expected["confusion_matrix"]
    assert not list(tmpdir_env.glob("bigft-eval-*"))


def test_eval_mistakes_are_one_line_and_leave_nothing(
    tiny_base: Path, tmp_path: Path, tmpdir_env: Path
) -> None:
    rows = write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(4))
    cases = [
        (
            ["--data", str(tmp_path / "nope.jsonl")],
            r"^error: --data .*nope\.jsonl: file not found$",
        ),
        (["--data", str(rows), "--task", "clasification"], r"^error: --task clasification: "),
        (["--data", str(rows), "data.format=chatt"], r"^error: command-line override data\.format"),
    ]
    for extra, message in cases:
        result = CliRunner().invoke(app, ["eval", str(tiny_base), *extra])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2, result.output
        assert len(lines) == 1 and "Traceback" not in result.output, lines
        assert re.search(message, lines[0]), lines[0]
    assert not list(tmpdir_env.glob("bigft-eval-*"))
