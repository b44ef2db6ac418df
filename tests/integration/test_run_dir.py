"""One run per output_dir: no silent mix with an earlier run, no two live runs, no orphans
training on after their launcher was killed."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bigft.commands import app
from bigft.rundir import LOCK
from tests.helpers import alpaca_rows, write_config, write_jsonl


@pytest.fixture
def config_file(tiny_base: Path, tmp_path: Path) -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(64))
    return write_config(tmp_path / "cfg.yaml", tiny_base, data, train={"steps": 2})


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(root.rglob("*"))
    }


def bigft(*args: str) -> object:
    return CliRunner().invoke(app, list(args))


def one_line_error(result: object, *needles: str) -> None:
    assert result.exit_code == 2, result.output  # type: ignore[attr-defined]
    lines = [x for x in result.stderr.splitlines() if x.strip()]  # type: ignore[attr-defined]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), lines
    assert "Traceback" not in result.output  # type: ignore[attr-defined]


def test_fresh_run_into_a_previous_run_is_refused_or_moved_aside(config_file: Path) -> None:
    out = config_file.parent / "out"
    assert bigft("train", str(config_file)).exit_code == 0
    before = snapshot(out)
    assert "summary.json" in before and LOCK not in before  # released at the end

    one_line_error(
        bigft("train", str(config_file), "train.resume=never"),
        "holds a previous run",
        "--overwrite",
    )
    # resume auto of a finished run without checkpoints would retrain over it: refused too
    one_line_error(bigft("train", str(config_file)), "no checkpoint to continue from")
    assert snapshot(out) == before

    result = bigft("train", str(config_file), "train.resume=never", "--overwrite")
    assert result.exit_code == 0, result.output
    aside = [p for p in out.parent.iterdir() if p.name.startswith("out.replaced-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before  # the old run, untouched
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # the new run's own log


def test_a_live_run_holds_the_directory(config_file: Path) -> None:
    out = config_file.parent / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        record = {"host": os.uname().nodename, "pid": holder.pid, "since": "now"}
        (out / LOCK).write_text(json.dumps(record))
        one_line_error(
            bigft("train", str(config_file)), "in use by another bigft run", str(holder.pid)
        )
        assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    result = bigft("train", str(config_file))  # the holder is gone: its lock is stale
    assert result.exit_code == 0, result.output
    assert "took over the lock" in result.output
    assert not (out / LOCK).exists()


@pytest.mark.slow
def test_killing_the_launch_group_stops_the_workers(config_file: Path) -> None:
    """kill -9 of `bigft launch`'s process group: torchrun's workers (in a session of their
    own) die with it; the resumed run's log reads like one uninterrupted run."""
    out = config_file.parent / "out"
    cmd = [sys.executable, "-m", "bigft", "launch", str(config_file), "--nproc", "2"]
    long = ["train.steps=400", "checkpoint.every_steps=3", "train.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        [*cmd, *long], env=env, start_new_session=True, stderr=subprocess.DEVNULL
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (
        metrics.is_file() and metrics.read_text().count('"loss"') >= 4
    ):
        time.sleep(0.5)
    assert metrics.is_file(), "the run never logged a step"
    workers = _processes_mentioning(str(config_file))
    assert len(workers) >= 3  # launch, torchrun, 2 workers
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 30
    while time.time() < deadline and _processes_mentioning(str(config_file)):
        time.sleep(0.5)
    assert not _processes_mentioning(str(config_file)), "workers outlived their launcher"

    resumed = subprocess.run(
        [*cmd, "train.steps=30", "checkpoint.every_steps=3", "train.log_every=1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 31))


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline or any(text in a for a in cmdline.split()):
            found.append(int(entry.name))
    return found
