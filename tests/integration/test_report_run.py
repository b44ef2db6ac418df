"""`bigft report` on the output_dir of a real (tiny) training run."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from bigft.commands import app
from bigft.config_io import load_config
from bigft.loop.setup import setup
from bigft.loop.train import train
from bigft.tracking import read_metrics
from tests.helpers import alpaca_rows, write_config, write_jsonl


def test_report_of_a_real_run_states_its_final_numbers(tiny_base: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(48))
    cfg = load_config(
        write_config(tmp_path / "cfg.yaml", tiny_base, data),
        ["train.steps=6", "eval.every_steps=3", "checkpoint.export=false"],
    )
    summary = train(setup(cfg))
    out = Path(cfg.output_dir)

    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    md = (out / "report" / "report.md").read_text()

    final = [r for r in read_metrics(out) if "loss" in r and "split" not in r][-1]
    assert final["step"] == 6
    assert f"| final train loss | {final['loss']:.6g} (step 6) |" in md
    eval_loss = summary["validation"]["eval_loss"]
    assert f"| validation | eval_loss | {eval_loss:.6g} | 6 |" in md
    assert f"| model | {tiny_base} |" in md and "| method | full |" in md
    assert "| steps | 6 |" in md
    saved = json.loads((out / "summary.json").read_text())
    assert saved["steps"] == 6 and saved["device"] == "cpu"
    from bigft.report.runs import load_run, memory_measure

    assert memory_measure(load_run(out)) == "peak process RSS (CPU)"  # what mem_mib was
    for name in ("loss.png", "tokens_per_s.png", "grad_norm.png"):
        assert (out / "report" / name).read_bytes()[:4] == b"\x89PNG", name
        assert f"]({name})" in md
    # The process's peak RSS may not move in 6 steps: then it is named in the note instead.
    memory = out / "report" / "memory.png"
    if memory.exists():
        assert memory.read_bytes()[:4] == b"\x89PNG" and "](memory.png)" in md
    else:
        assert "peak process RSS (CPU) " in md
    # the config's constant schedule and a run without skipped steps: named, not drawn
    assert "Not plotted, the same at every logged step: learning rate 0.003; skipped_steps 0" in md
    assert not (out / "report" / "lr.png").exists()
