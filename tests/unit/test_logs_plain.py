"""What a run prints: plain unwrapped lines in a file (a Slurm log), the progress bar in a
terminal, and a start-up optimizer table with the configured learning rates and counts."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigft.config import OptimConfig, ScheduleConfig
from bigft.optim import build_optimizer, build_scheduler, describe_groups
from tests.helpers import alpaca_rows, write_config, write_jsonl

STEP_LINE = re.compile(
    r"^step (\d+)/6  loss \d+\.\d{4}  lr (\S+)  [\d,]+ tok/s  mem [\d,]+ MiB  eta (\S+)$",
    re.MULTILINE,
)
TABLE_ROW = re.compile(r"^\s+(\S+)\s+([\d,]+) params  lr (\S+)  wd \S+$", re.MULTILINE)
ANSI = "\x1b["


def _config(tmp_path: Path, tiny_base: Path, output_dir: Path, progress_bar: bool) -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(64))
    return write_config(
        tmp_path / "cfg.yaml",
        tiny_base,
        data,
        train={"steps": 6, "log_every": 2},
        schedule={"name": "constant", "warmup_steps": None, "warmup_ratio": 0.5},
        eval={"every_steps": 3},
        logging={"progress_bar": progress_bar, "trackers": []},
        output_dir=str(output_dir),
    )


def test_a_log_file_gets_one_plain_unwrapped_line_per_logged_step(tiny_base, tmp_path) -> None:
    """`bigft train > log 2>&1`, as in every Slurm job: the progress bar is replaced by
    plain lines, nothing wraps at 80 columns, no terminal codes."""
    out = tmp_path / ("a-run-directory-whose-path-is-longer-than-eighty-columns-" + "x" * 40)
    cfg = _config(tmp_path, tiny_base, out, progress_bar=True)
    log = tmp_path / "slurm-123.out"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR")}
    with log.open("w") as stream:
        proc = subprocess.run(
            [sys.executable, "-m", "bigft", "train", str(cfg)],
            stdout=stream,
            stderr=subprocess.STDOUT,
            env={**env, "OMP_NUM_THREADS": "1"},
            timeout=300,
        )
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert ANSI not in text and "━" not in text, text

    lines = STEP_LINE.findall(text)
    assert [int(step) for step, _, _ in lines] == [2, 4, 6], text
    logged = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in logged if "loss" in r]
    assert [float(lr) for _, lr, _ in lines] == pytest.approx(lrs, rel=1e-3)
    assert lines[-1][2] == "0:00:00"  # nothing left at the last step
    assert re.search(r"^step 3 validation: eval_loss ", text, re.MULTILINE), text
    assert re.search(rf"^output\s+{re.escape(str(out))}\s*$", text, re.MULTILINE), text

    # the start-up table shows the configured lr, not warmup's first value
    rows = TABLE_ROW.findall(text)
    assert [name for name, _, _ in rows] == ["decay", "no_decay"], text
    assert all(lr == "0.003" for _, _, lr in rows), text
    assert lrs[0] < 3e-3


@pytest.mark.parametrize("terminal", [True, False])
def test_the_progress_bar_is_for_terminals_only(tiny_base, tmp_path, terminal: bool) -> None:
    from rich.console import Console

    from bigft.config_io import load_config
    from bigft.loop.setup import setup
    from bigft.loop.train import train

    cfg = load_config(_config(tmp_path, tiny_base, tmp_path / "out", progress_bar=True))
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=terminal, width=100)
    train(setup(cfg, console))
    text = stream.getvalue()
    if terminal:
        assert "━" in text and ANSI in text, text
        assert not STEP_LINE.findall(text), text
    else:
        assert ANSI not in text and "━" not in text, text
        assert [int(s) for s, _, _ in STEP_LINE.findall(text)] == [2, 4, 6], text


def test_start_up_table_shows_each_groups_configured_peak_lr_during_warmup() -> None:
    """Layer-wise decay gives each depth its own lr; after the scheduler has applied
    warmup's first (small) value the table still shows each group's configured one."""
    from bigft.tiny import build_tiny_llama

    model = build_tiny_llama(vocab_size=100)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1, layer_decay=0.5))
    configured = [group["lr"] for group in optimizer.param_groups]
    assert len(set(configured)) >= 3
    build_scheduler(optimizer, ScheduleConfig(name="cosine", warmup_ratio=0.5), total_steps=10)
    assert all(g["lr"] < lr for g, lr in zip(optimizer.param_groups, configured, strict=True))
    shown = [float(lr) for _, _, lr in TABLE_ROW.findall(describe_groups(optimizer))]
    assert shown == pytest.approx(configured, rel=1e-2)


def test_start_up_table_counts_zero3_partitions_by_their_full_size() -> None:
    """A ZeRO-3 parameter holds this rank's slice; `ds_numel` is the whole parameter."""
    linear = torch.nn.Linear(64, 32)
    for param in linear.parameters():
        param.ds_numel = param.numel()
        param.ds_shape = param.shape
        param.data = torch.empty(param.numel() // 4)  # this rank's quarter, flattened
    optimizer = build_optimizer(linear, OptimConfig(lr=1e-3))
    counts = {
        name: int(n.replace(",", ""))
        for name, n, _ in TABLE_ROW.findall(describe_groups(optimizer))
    }
    assert counts == {"decay": 64 * 32, "no_decay": 32}
