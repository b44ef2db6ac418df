"""`bigft export --out` never deletes what bigft did not write.

Each case runs the command (in-process, from the working folder) against a finished run
and compares every file under that folder before and after: a refused export changes
nothing (no `.tmp` left either), prints one line and exits 2.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bigft.commands import app
from bigft.config_io import load_config
from bigft.loop.setup import setup
from bigft.loop.train import train
from tests.helpers import alpaca_rows, write_config, write_jsonl


@pytest.fixture(scope="module")
def workspace(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/demo (a finished 2-step run), runs/other (another run), mydocs (a user's
    files) and notes.txt (a user's file)."""
    root = tmp_path_factory.mktemp("export")
    data = write_jsonl(root / "train.jsonl", alpaca_rows(48))
    for name in ("demo", "other"):
        cfg = write_config(root / f"{name}.yaml", tiny_base, data)
        out = root / "runs" / name
        train(
            setup(
                load_config(cfg, ["train.steps=2", "checkpoint.every_steps=1", f"output_dir={out}"])
            )
        )
    (root / "mydocs").mkdir()
    (root / "mydocs" / "thesis.tex").write_text("years of work\n")
    (root / "notes.txt").write_text("keep me\n")
    return root


def snapshot(root: Path) -> dict[str, str]:
    files = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        files[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return files


def export(root: Path, *args: str) -> Any:
    """`bigft export runs/demo ARGS` run from `root`; the result has exit_code and stderr."""
    here = Path.cwd()
    try:
        os.chdir(root)
        return CliRunner().invoke(app, ["export", "runs/demo", *args])
    finally:
        os.chdir(here)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--out", "runs/demo"], "run directory"),
        (["--out", "runs"], "holding the run"),
        (["--out", "."], "holding the run"),  # the working folder holds the run too
        (["--out", "mydocs"], "not a bigft export"),
        (["--out", "notes.txt"], "is a file"),
        (["--out", "runs/demo", "--overwrite"], "run directory"),
        (["--out", "runs", "--overwrite"], "holding the run"),
        (["--out", "runs/other", "--overwrite"], "another run"),
        (["--out", "runs/demo/checkpoints", "--overwrite"], "part of the run"),
        (["--out", "runs/demo/final"], "own final model"),
    ],
)
def test_refused_exports_touch_nothing(workspace: Path, args: list[str], says: str) -> None:
    before = snapshot(workspace)
    proc = export(workspace, *args)
    assert proc.exit_code == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(workspace) == before


def test_export_replaces_only_its_own_output(workspace: Path, tmp_path: Path) -> None:
    out = workspace / "exports" / "demo"
    first = export(workspace, "--out", "exports/demo")
    assert first.exit_code == 0, first.stderr
    assert (out / "model.safetensors").is_file() and (out / "bigft_export.json").is_file()
    # Weights are as readable as every other file (safetensors writes them 0600).
    run = workspace / "runs" / "demo"
    weights = [
        out / "model.safetensors",
        run / "final" / "model.safetensors",
        *(run / "checkpoints").rglob("*.safetensors"),
    ]
    assert len(weights) >= 3
    for path in weights:
        assert path.stat().st_mode & 0o777 == (out / "config.json").stat().st_mode & 0o777, path
    assert out.stat().st_mode & 0o055 == 0o055  # the export folder is shared too
    # A previous export is replaced without --overwrite; nothing else moves.
    before = snapshot(workspace)
    again = export(workspace, "--out", "exports/demo")
    assert again.exit_code == 0, again.stderr
    assert snapshot(workspace) == before
    assert not [p for p in (workspace / "exports").iterdir() if p.name != "demo"]  # no .tmp

    # A user's folder is replaced only when asked, and bigft says so.
    user = workspace / "exports" / "mine"
    user.mkdir()
    (user / "keep.txt").write_text("mine\n")
    refused = export(workspace, "--out", "exports/mine")
    assert refused.exit_code == 2 and (user / "keep.txt").is_file()
    replaced = export(workspace, "--out", "exports/mine", "--overwrite")
    assert replaced.exit_code == 0, replaced.stderr
    assert "previous contents were replaced" in replaced.output
    assert not (user / "keep.txt").exists() and (user / "model.safetensors").is_file()
    assert sorted(p.name for p in (workspace / "exports").iterdir()) == ["demo", "mine"]
