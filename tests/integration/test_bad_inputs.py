"""Every broken config or dataset: one line naming file/line/key, exit 2, nothing written."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bigft.commands import app
from tests.conftest import ASSETS

BAD = ASSETS / "bad"
EXPECTED: dict[str, str] = yaml.safe_load((BAD / "expected.yaml").read_text())


def test_there_are_enough_cases() -> None:
    assert len(EXPECTED) >= 15
    assert {p.stem for p in BAD.glob("*.yaml")} - {"expected"} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_input(name: str, tiny_base: Path, tmp_path: Path) -> None:
    # Copy the case so relative data paths resolve and nothing lands in the repo.
    case = tmp_path / "case"
    shutil.copytree(BAD, case)
    out = tmp_path / "out"
    args = ["train", str(case / f"{name}.yaml"), f"output_dir={out}"]
    if name != "missing_model_dir":
        args.append(f"model.name_or_path={tiny_base}")
    if name == "missing_output_dir":
        args.remove(f"output_dir={out}")
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    assert re.search(EXPECTED[name], lines[0]), lines[0]
    assert not out.exists()


def test_real_process_exit_code_and_stderr(tmp_path: Path) -> None:
    shutil.copytree(BAD, tmp_path / "case")
    proc = subprocess.run(
        [sys.executable, "-m", "bigft", "train", str(tmp_path / "case" / "unknown_key.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr
    assert "did you mean 'lr'" in proc.stderr
