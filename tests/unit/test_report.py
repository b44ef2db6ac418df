"""`bigft report` / `bigft compare` on run directories written by hand."""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from bigft.commands import app
from bigft.report.render import report_panels
from bigft.report.runs import best_point, config_diff, latest_per_step, load_run, lower_is_better

runner = CliRunner()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _config(lr: float = 1e-3, **extra: Any) -> dict[str, Any]:
    return {
        "model": {"name_or_path": "/models/tiny-llama"},
        "method": {"name": "lora", "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}},
        "parallel": {"strategy": "zero2"},
        "optim": {"lr": lr, "betas": [0.9, 0.999]},
        **extra,
    }


def _train(step: int, loss: float, **extra: float) -> dict[str, Any]:
    lr, grad_norm = 1e-4 * step, 0.5 + 0.01 * step
    return {"time": 0.0, "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, **extra}


def _eval(step: int, loss: float, accuracy: float, split: str = "validation") -> dict[str, Any]:
    return {
        "step": step,
        "split": split,
        "eval_loss": loss,
        "eval_tokens": 900,
        "eval_accuracy": accuracy,
    }


def make_run(
    path: Path, records: list[dict[str, Any]], config: dict[str, Any] | None = None
) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "config.yaml").write_text(yaml.safe_dump(config or _config()))
    (path / "summary.json").write_text(json.dumps({"steps": 8, "world_size": 2}))
    return path


def resumed_records() -> list[dict[str, Any]]:
    """Steps 1-6 logged, then a resume from the step-4 checkpoint logs 5-8 again.

    The first attempt's step-6 evaluation is better than anything after the resume: it
    must not be reported, since the run the user has no longer contains it.
    """
    first = [_train(s, 3.0 - 0.1 * s, tokens_per_s=1000.0) for s in range(1, 7)]
    first += [_eval(4, 2.4, 0.50), _eval(6, 0.5, 0.99)]
    second = [
        _train(s, 2.0 - 0.05 * s, tokens_per_s=3000.0, mem_mib=500.0 + s) for s in (5, 6, 7, 8)
    ]
    second += [_eval(6, 1.9, 0.70), _eval(8, 2.1, 0.75), _eval(8, 2.2, 0.60, split="test")]
    return [*first, *second]


def test_last_record_per_step_and_split_wins() -> None:
    train, evals = latest_per_step(resumed_records())
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert train[4]["loss"] == pytest.approx(1.75)  # step 5 from the resumed part
    assert list(evals) == ["validation", "test"]
    assert [(r["step"], r["eval_loss"]) for r in evals["validation"]] == [
        (4, 2.4),
        (6, 1.9),
        (8, 2.1),
    ]
    assert [r["step"] for r in evals["test"]] == [8]


@pytest.mark.parametrize(
    ("metric", "lower"),
    [
        ("eval_loss", True),
        ("eval_ppl", True),
        ("eval_mse", True),
        ("eval_mae", True),
        ("eval_accuracy", False),
        ("eval_f1_macro", False),
        ("eval_auc", False),
        ("exact_match", False),
    ],
)
def test_direction_of_best(metric: str, lower: bool) -> None:
    assert lower_is_better(metric) is lower
    best = best_point(metric, [1, 2, 3, 4], [0.5, 0.2, 0.9, 0.2])
    assert best is not None
    assert (best.step, best.value) == ((2, 0.2) if lower else (3, 0.9))


def test_best_ignores_nan_and_takes_the_earliest_tie() -> None:
    best = best_point("eval_loss", [1, 2, 3], [math.nan, 1.5, 1.5])
    assert best is not None and (best.step, best.value) == (2, 1.5)
    assert best_point("eval_loss", [1], [math.nan]) is None


def test_config_diff_shows_only_differing_dotted_keys() -> None:
    a = _config(lr=1e-3, output_dir="runs/a", train={"steps": 10})
    b = _config(lr=2e-3, output_dir="runs/b", train={"steps": 10, "seed": 1})
    b["method"]["lora"]["target_modules"] = ["q_proj"]
    assert config_diff([a, b]) == [
        ("method.lora.target_modules", ['["q_proj", "v_proj"]', '["q_proj"]']),
        ("optim.lr", ["0.001", "0.002"]),
        ("train.seed", ["-", "1"]),
    ]
    assert config_diff([a, a]) == []


def test_panels_follow_the_deduplicated_records(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path / "run", resumed_records()))
    panels = {p.name: p for p in report_panels(run)}
    assert set(panels) == {"loss", "lr", "grad_norm", "tokens_per_s", "memory", "eval_accuracy"}
    train, validation, test = panels["loss"].series
    assert (train.label, train.steps) == ("train loss", [1, 2, 3, 4, 5, 6, 7, 8])
    assert (validation.label, validation.values) == ("validation eval_loss", [2.4, 1.9, 2.1])
    assert (test.label, test.steps, test.values) == ("test eval_loss", [8], [2.2])
    assert panels["memory"].series[0].steps == [5, 6, 7, 8]  # only the resumed part logged it


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_report_writes_markdown_with_numbers_and_real_pngs(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "lora-r8", resumed_records())
    (run_dir / "checkpoints").mkdir()
    best = {"checkpoint": "step-00000006", "metric": "eval_loss", "value": 1.9, "step": 6}
    (run_dir / "checkpoints" / "best.json").write_text(json.dumps({**best, "bad_evals": 1}))
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    report = run_dir / "report" / "report.md"
    assert result.stdout.strip() == str(report)
    md = report.read_text()
    assert "# Run report: lora-r8" in md
    for row in (
        "| model | /models/tiny-llama |",
        "| method | lora |",
        "| strategy | zero2 |",
        "| steps | 8 |",
        "| final train loss | 1.6 (step 8) |",
        "| mean tokens/s | 2000 |",  # 4 steps at 1000 (1-4) and 4 at 3000 (5-8)
        # final at step 8; best is min for the loss, max for the accuracy, both post-resume
        "| validation | eval_loss | 2.1 | 8 | 1.9 | 6 |",
        "| validation | eval_accuracy | 0.75 | 8 | 0.75 | 8 |",
        "| test | eval_loss | 2.2 | 8 | 2.2 | 8 |",
        "| best checkpoint | step-00000006 (eval_loss 1.9 at step 6) |",
    ):
        assert row in md, row
    assert "eval_tokens" not in md and "0.99" not in md
    images = [line[line.index("(") + 1 : -1] for line in md.splitlines() if line.startswith("![")]
    assert sorted(images) == sorted(
        f"{n}.png" for n in ("loss", "lr", "grad_norm", "tokens_per_s", "memory", "eval_accuracy")
    )
    for name in images:
        png = report.parent / name
        assert _png_size(png) == (640, 360)
        assert png.stat().st_size > 5_000, name

    # the loss panel really holds the train line (C0 blue) and the eval line (C1 orange)
    from matplotlib.image import imread

    pixels = imread(report.parent / "loss.png")[..., :3]
    for rgb in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        close = (abs(pixels - [c / 255 for c in rgb]).max(axis=-1) < 0.02).sum()
        assert close > 100, rgb


def test_a_line_cut_short_by_a_kill_is_skipped_and_noted(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", resumed_records())
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines.insert(6, '{"time": 1.0, "step": 7, "lo')  # the kill, then the resumed appends
    (run_dir / "metrics.jsonl").write_text("".join(lines))
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    md = (run_dir / "report" / "report.md").read_text()
    assert "1 line(s) of metrics.jsonl were not JSON" in md
    assert "| final train loss | 1.6 (step 8) |" in md


def test_report_out_dir_option(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", resumed_records())
    result = runner.invoke(app, ["report", str(run_dir), "--out", str(tmp_path / "elsewhere")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "elsewhere" / "report.md").is_file()
    assert not (run_dir / "report").exists()


def test_compare_tables_markdown_and_overlay(tmp_path: Path) -> None:
    a = make_run(tmp_path / "lr-1e-3", resumed_records(), _config(lr=1e-3, output_dir="x"))
    slower = [
        {**r, "eval_loss": r["eval_loss"] + 0.5} if "eval_loss" in r else r
        for r in resumed_records()
    ]
    b = make_run(tmp_path / "lr-2e-3", slower, _config(lr=2e-3, output_dir="y"))
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(a), str(b), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for text in ("lr-1e-3", "lr-2e-3", "optim.lr", "best validation eval_loss: lr-1e-3"):
        assert text in result.stdout, text
    md = (out / "compare.md").read_text()
    for row in (
        "|  | lr-1e-3 | lr-2e-3 |",
        "| steps | 8 | 8 |",
        "| final train loss | 1.6 (step 8) | 1.6 (step 8) |",
        "| validation eval_loss final | 2.1 (step 8) | 2.6 (step 8) |",
        "| validation eval_loss best | 1.9 (step 6) | 2.4 (step 6) |",
        "| validation eval_accuracy best | 0.75 (step 8) | 0.75 (step 8) |",
        "| optim.lr | 0.001 | 0.002 |",
        "best validation eval_loss: lr-1e-3, 1.9 at step 6",
    ):
        assert row in md, row
    assert "output_dir" not in md and "method.name" not in md
    assert _png_size(out / "compare.png") == (1280, 360)


def test_compare_ranks_by_a_score_metric_with_short_name(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", resumed_records())
    worse = [{**r, "eval_accuracy": 0.1} if "eval_accuracy" in r else r for r in resumed_records()]
    b = make_run(tmp_path / "b", worse, _config(lr=5e-4))
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(b), str(a), "-o", str(out), "-m", "accuracy"])
    assert result.exit_code == 0, result.output
    assert "best validation eval_accuracy: a, 0.75 at step 8" in (out / "compare.md").read_text()


def _fails(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


def test_bad_inputs_give_one_line_errors(tmp_path: Path) -> None:
    _fails(["report", str(tmp_path / "missing")], "does not exist")
    (tmp_path / "empty").mkdir()
    _fails(["report", str(tmp_path / "empty")], "has no metrics.jsonl")
    (tmp_path / "empty" / "metrics.jsonl").write_text("\n")
    _fails(["report", str(tmp_path / "empty")], "holds no records")
    run = make_run(tmp_path / "run", resumed_records())
    _fails(["compare", str(run)], "at least two run directories")
    _fails(["compare", str(run), str(tmp_path / "missing")], "does not exist")
    _fails(["compare", str(run), str(run), "--metric", "eval_f1"], "logged: eval_accuracy, ")


def test_missing_matplotlib_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run(tmp_path / "run", resumed_records())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    _fails(["report", str(run)], "pip install 'bigft[track]'")
    assert not (run / "report").exists()
