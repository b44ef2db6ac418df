"""Text augmentation through the commands: `bigft data prepare` reports the rows added,
`bigft data preview` shows training rows next to their augmented copies, and a short
causal-LM run trains on the prepared (augmented) rows."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from bigft.commands import app
from bigft.config_io import load_config
from bigft.loop.setup import setup
from bigft.loop.train import train
from tests.helpers import alpaca_rows, write_config, write_jsonl


def _config(tmp_path: Path, tiny_base: Path) -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(40))
    (tmp_path / "synonyms.txt").write_text("uppercase, capitalize\nreverse, invert, flip\n")
    augment = {"text": {"copies": 2, "synonyms": "synonyms.txt", "synonym_replacement": 1.0}}
    return write_config(
        tmp_path / "cfg.yaml",
        tiny_base,
        data,
        data={"augment": augment, "prepared_dir": str(tmp_path / "store")},
        train={"steps": 4},
    )


def test_prepare_and_preview_report_the_augmented_rows(tiny_base: Path, tmp_path: Path) -> None:
    path = _config(tmp_path, tiny_base)
    prepared = CliRunner().invoke(app, ["data", "prepare", str(path)])
    assert prepared.exit_code == 0, prepared.output
    (digest,) = [p for p in (tmp_path / "store").iterdir() if p.is_dir()]
    train = json.loads((digest / "stats.json").read_text())["splits"]["train"]
    # 'Uppercase.' has one synonym (one distinct copy), 'Reverse.' two (two copies)
    assert train["augmented"] > 0
    assert f"added to train: {train['augmented']} augmented rows" in prepared.output

    shown = CliRunner().invoke(app, ["data", "preview", str(path), "-n", "2"])
    assert shown.exit_code == 0, shown.output
    out = shown.output
    assert f"{train['augmented']} rows added to train" in out
    assert "original" in out and "copy 1 (synonym_replacement)" in out
    assert "instruction: Uppercase." in out or "instruction: Reverse." in out
    assert "instruction: Capitalize." in out or "instruction: Invert." in out


def test_a_run_trains_on_the_augmented_rows(tiny_base: Path, tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, tiny_base))
    run = setup(cfg)
    stats = run.data.stats.splits["train"]
    assert stats.augmented > 0 and stats.rows_loaded == 32 + stats.augmented  # 80 % of 40
    assert len(run.data.train) == stats.rows_kept
    prompts = {run.tokenizer.decode(ids) for ids in run.data.train["input_ids"]}
    assert any("Capitalize." in p for p in prompts) and any("Uppercase." in p for p in prompts)
    assert run.data.validation is not None
    held_out = [run.tokenizer.decode(ids) for ids in run.data.validation["input_ids"]]
    assert not any(w in p for p in held_out for w in ("Capitalize.", "Invert.", "Flip."))
    summary = train(run)
    assert summary["steps"] == 4 and Path(summary["final_model"]).is_dir()
