"""What `bigft report` and `bigft compare` draw: the step-0 evaluation, log scale for a
loss spanning decades, constant series left out with a note, memory named by what it
measures, and runs told apart by their paths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from bigft.commands import app
from bigft.report.render import figure, report_panels, run_names, split_constant
from bigft.report.runs import load_run

runner = CliRunner()


def _write_run(
    path: Path, records: list[dict[str, Any]], summary: dict[str, Any] | None = None
) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "summary.json").write_text(json.dumps(summary or {"steps": 8}))
    return path


def demo_like_records(first_loss: float = 5.0, last_loss: float = 0.05) -> list[dict[str, Any]]:
    """An evaluation before training (eval.at_start: exact match 0), eight logged steps
    whose loss falls from `first_loss` to `last_loss`, evaluations at steps 4 and 8."""
    records: list[dict[str, Any]] = [
        {"step": 0, "split": "validation", "eval_loss": first_loss, "exact_match": 0.0}
    ]
    for step in range(1, 9):
        loss = first_loss * (last_loss / first_loss) ** ((step - 1) / 7)
        records.append(
            {
                "time": 1.0,
                "step": step,
                "loss": round(loss, 6),
                "lr": 1e-3 * step / 8,
                "grad_norm": 1.0 / step,
                "tokens_per_s": 900.0 + step,
                "epoch": step / 8,
                "mem_mib": 300.0 + step,
                "skipped_steps": 0,
            }
        )
        if step in (4, 8):
            match = 0.6 if step == 4 else 0.99
            evaluation = {"eval_loss": last_loss * 1.5, "exact_match": match}
            records.append({"step": step, "split": "validation", **evaluation})
    return records


def test_the_evaluation_before_training_is_a_point_of_the_plot(tmp_path: Path) -> None:
    run = load_run(_write_run(tmp_path / "demo", demo_like_records()))
    panels = {p.name: p for p in report_panels(run)}
    [line] = panels["exact_match"].series
    assert (line.steps, line.values) == ([0, 4, 8], [0.0, 0.6, 0.99])
    eval_loss = panels["loss"].series[1]
    assert eval_loss.steps == [0, 4, 8]

    ax = figure([panels["exact_match"]]).axes[0]
    assert np.asarray(ax.lines[0].get_xydata()).tolist() == [[0, 0.0], [4, 0.6], [8, 0.99]]
    assert ax.get_xlim()[0] <= 0 and ax.get_ylim()[0] <= 0.0


def test_the_report_states_the_step_zero_score(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path / "demo", demo_like_records())
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    md = (run_dir / "report" / "report.md").read_text()
    assert "| validation | exact_match | 0.99 | 8 | 0.99 | 8 |" in md
    assert "![exact_match](exact_match.png)" in md


@pytest.mark.parametrize(("first_loss", "log"), [(5.0, True), (0.6, False)])
def test_a_loss_spanning_more_than_a_decade_is_drawn_on_a_log_scale(
    tmp_path: Path, first_loss: float, log: bool
) -> None:
    # 5.0 -> 0.05 spans two decades; 0.6 -> 0.1 less than one (the evaluations lie between)
    records = demo_like_records(first_loss, 0.05 if log else 0.1)
    run = load_run(_write_run(tmp_path / "run", records))
    loss = next(p for p in report_panels(run) if p.name == "loss")
    assert loss.log_y is log
    ax = figure([loss]).axes[0]
    assert ax.get_yscale() == ("log" if log else "linear")
    assert ax.get_ylabel() == ("loss (log scale)" if log else "loss")
    assert ax.get_title() == "loss"
    assert [np.asarray(line.get_xydata()).shape for line in ax.lines] == [(8, 2), (3, 2)]


def test_constant_series_are_left_out_and_named_in_one_line(tmp_path: Path) -> None:
    records = demo_like_records()
    for record in records:
        if "lr" in record:
            record["lr"] = 1e-3  # a constant schedule
    run_dir = _write_run(tmp_path / "run", records)
    panels, constant = split_constant(report_panels(load_run(run_dir)))
    assert [p.name for p in panels] == [
        "loss",
        "grad_norm",
        "tokens_per_s",
        "memory",
        "exact_match",
    ]
    assert constant == ["learning rate 0.001", "skipped_steps 0"]

    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    md = (run_dir / "report" / "report.md").read_text()
    assert "Not plotted, the same at every logged step: learning rate 0.001; skipped_steps 0." in md
    assert "](lr.png)" not in md and "](skipped_steps.png)" not in md
    assert not (run_dir / "report" / "skipped_steps.png").exists()
    assert (run_dir / "report" / "grad_norm.png").is_file()


def test_a_single_evaluation_is_still_plotted(tmp_path: Path) -> None:
    records: list[dict[str, Any]] = [{"step": s, "loss": 2.0 - 0.1 * s} for s in (1, 2, 3)]
    records.append({"step": 3, "split": "test", "eval_loss": 1.9, "eval_accuracy": 0.5})
    panels, constant = split_constant(report_panels(load_run(_write_run(tmp_path / "r", records))))
    assert [p.name for p in panels] == ["loss", "eval_accuracy"] and constant == []


@pytest.mark.parametrize(
    ("summary", "title"),
    [
        ({"steps": 8}, "peak memory (GPU allocated on CUDA, process RSS on CPU)"),
        ({"steps": 8, "device": "cuda:0"}, "peak GPU memory allocated"),
        ({"steps": 8, "engine": {"device": "cpu"}}, "peak process RSS (CPU)"),
        ({"steps": 8, "engine": {"distributed_type": "MULTI_CPU"}}, "peak process RSS (CPU)"),
        ({"steps": 8, "engine": {"distributed_type": "DEEPSPEED"}}, "peak memory (GPU"),
    ],
)
def test_memory_is_labelled_with_what_it_measures(
    tmp_path: Path, summary: dict[str, Any], title: str
) -> None:
    run = load_run(_write_run(tmp_path / "run", demo_like_records(), summary))
    memory = next(p for p in report_panels(run) if p.name == "memory")
    ax = figure([memory]).axes[0]
    assert ax.get_title().startswith(title)
    assert ax.get_ylabel() == "MiB (busiest process)"


def test_compare_names_runs_by_their_shortest_distinct_path(tmp_path: Path) -> None:
    a = _write_run(tmp_path / "runs" / "a" / "out", demo_like_records())
    b = _write_run(tmp_path / "runs" / "b" / "out", demo_like_records(0.6, 0.1))
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(a), str(b), "--out", str(out), "-m", "exact_match"])
    assert result.exit_code == 0, result.output
    md = (out / "compare.md").read_text()
    assert "|  | a/out | b/out |" in md
    assert "best validation exact_match: a/out, 0.99 at step 8" in md

    c = _write_run(tmp_path / "c", demo_like_records())
    runs = [load_run(p) for p in (a, b, c, a)]
    assert run_names(runs[:3]) == ["a/out", "b/out", "c"]
    assert run_names([runs[2], runs[2]]) == [f"{c} (1)", f"{c} (2)"]
    assert run_names([load_run(p) for p in (a, b)]) == ["a/out", "b/out"]
    x = _write_run(tmp_path / "x" / "a" / "out", demo_like_records())
    assert run_names([load_run(p) for p in (a, x)]) == ["runs/a/out", "x/a/out"]
