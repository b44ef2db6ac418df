"""Every command in the README's code blocks runs as written (those that can run on CPU).

The commands are read from README.md. Each one must be listed in `COVERED`: run as written
(in a scratch folder holding `configs/my-run.yaml` / `cfg.yaml` made from the README's own
YAML example, around the tiny base model) with only the substitutions listed there, or
skipped with the reason and the tests that cover it instead. A command added to the README
and not listed here fails the test, so the README cannot drift from what runs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import write_jsonl

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"

RUN = "run"
SKIP = "skip"
# command as in the README (comment removed, spaces collapsed) -> (what, detail)
# what RUN: detail is a list of (old, new) substitutions for a short CPU run.
# what SKIP: detail says why, and where it is tested instead.
COVERED: dict[str, tuple[str, Any]] = {
    "make demo": (RUN, "the demo itself, with fewer steps; see test_readme_demo_runs"),
    "make test": (SKIP, "the test suite itself (CI runs it)"),
    "make install-dev": (SKIP, "installs packages (CI's .ci/run does, from nothing)"),
    "make lint typecheck": (SKIP, "CI and every session run them; see test_make_targets"),
    "bigft config show configs/my-run.yaml optim.lr=1e-4": (RUN, []),
    "bigft data preview configs/my-run.yaml": (RUN, []),
    "bigft train configs/my-run.yaml train.steps=1000": (
        RUN,
        [("train.steps=1000", "train.steps=6")],
    ),
    "bigft launch cfg.yaml --nproc 8": (
        SKIP,
        "8 processes; 2-process launches run in tests/integration/test_launch*.py",
    ),
    "torchrun --nproc_per_node 8 -m bigft train cfg.yaml": (
        SKIP,
        "8 processes; torchrun launches run in tests/integration (2 processes, gloo)",
    ),
    "accelerate launch --config_file launch/accelerate/zero3.yaml -m bigft train cfg.yaml": (
        SKIP,
        "multi-process ZeRO-3; tests/integration/test_engines*.py run it on 2 CPU processes",
    ),
    "bigft launch cfg.yaml --nproc 8 --nnodes 2 --node-rank $NODE --master-addr $HEAD": (
        SKIP,
        "two nodes; tests/slurm run multi-node rendezvous on the local two-node cluster",
    ),
    "bigft report runs/llama3-chat": (RUN, []),
    "bigft compare runs/lr-1e-4 runs/lr-2e-4 --out cmp --metric eval_accuracy": (RUN, []),
    "bigft slurm render cfg.yaml --nodes 2 --gpus-per-node 8 --time 2-00:00:00 --check": (
        SKIP,
        "--check asks slurmctld; tests/slurm/test_render.py and test_cluster.py run it",
    ),
    "bigft slurm submit cfg.yaml --nodes 4 optim.lr=1e-5": (
        SKIP,
        "needs a Slurm cluster; tests/slurm/test_cluster.py submits to the local one",
    ),
    "bigft slurm status runs/my-run": (SKIP, "needs a submitted job; tests/slurm"),
    "bigft slurm sweep cfg.yaml --grid optim.lr=1e-5,2e-5 --grid train.seed=1,2": (
        SKIP,
        "needs a Slurm cluster; tests/slurm/test_cluster.py runs a sweep",
    ),
    "bigft slurm sweep-status runs/my-run": (SKIP, "needs a submitted sweep; tests/slurm"),
    "python -m bigft.digits digits": (RUN, []),
    "bigft train configs/examples/digits-vit-pretrain.yaml": (
        RUN,
        [("pretrain.yaml", "pretrain.yaml train.steps=20 eval.every_steps=20")],
    ),
    "bigft train configs/examples/digits-vit-transfer.yaml": (
        RUN,
        [("transfer.yaml", "transfer.yaml train.steps=5")],
    ),
    "bigft train configs/examples/digits-clip.yaml": (
        RUN,
        [("clip.yaml", "clip.yaml train.steps=10 eval.every_steps=10")],
    ),
    "bigft export runs/llama3-chat --quantize nf4 --out exports/llama3-chat-nf4": (RUN, []),
    "bigft export runs/llama3-chat --quantize gguf:q8_0 --out exports/llama3-chat-gguf": (
        RUN,
        [],
    ),
    "bigft prune runs/llama3-chat --sparsity 0.5 --pattern 2:4 --out exports/llama3-chat-2of4": (
        RUN,
        [],
    ),
}


def readme_commands() -> list[str]:
    """The command lines of the README's bash code blocks, comments removed."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            command = " ".join(line.split("#", 1)[0].split())
            if command:
                commands.append(command)
    return commands


def readme_config() -> dict[str, Any]:
    """The README's first YAML example: the config its commands are shown with."""
    block = re.search(r"```yaml\n(.*?)```", README.read_text(), re.S)
    assert block is not None, "README.md has no YAML example"
    return dict(yaml.safe_load(block.group(1)))


def test_every_readme_command_is_covered() -> None:
    commands = readme_commands()
    assert len(commands) >= 10
    missing = [c for c in commands if c not in COVERED]
    assert not missing, f"README commands not run or explained in {__file__}: {missing}"
    stale = [c for c in COVERED if c not in commands]
    assert not stale, f"no longer in the README: {stale}"


def test_make_targets_use_only_the_python_given() -> None:
    """`make X PYTHON=.venv/bin/python` runs every tool through that interpreter: nothing
    needs the venv activated (or a `bigft` / `ruff` / `mypy` on PATH)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    python = "/nonexistent/venv/bin/python"
    for target in ("demo", "test", "test-fast", "lint", "typecheck", "install-dev"):
        # Under `make test` itself, make's own variables would add "Entering directory".
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
        out = subprocess.run(
            ["make", "--no-print-directory", "-n", "-B", target, f"PYTHON={python}"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for line in filter(None, (line.strip() for line in out.splitlines())):
            tool = shlex.split(line)[0]
            assert tool == python, f"make {target}: `{line}` does not run through $(PYTHON)"


def _scratch(tmp_path: Path, tiny_base: Path) -> Path:
    """A folder laid out as the README's commands expect, around the tiny base model."""
    work = tmp_path / "work"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Say {w}."},
                {"role": "assistant", "content": w.upper()},
            ]
        }
        for w in ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel") * 6
    ]
    write_jsonl(work / "data" / "train.jsonl", rows)
    config = readme_config()
    config["model"]["name_or_path"] = str(tiny_base)
    config["data"]["train"] = str(work / "data" / "train.jsonl")
    config["train"].update(
        seq_len=64, micro_batch_size=2, global_batch_size=4, precision="fp32", steps=6
    )
    config["eval"] = {"every_steps": 3}
    config["checkpoint"] = {"every_steps": 3, "keep_last": 1}
    config["output_dir"] = str(work / "runs" / "llama3-chat")
    (work / "configs").mkdir(parents=True)
    (work / "configs" / "my-run.yaml").write_text(yaml.safe_dump(config))
    shutil.copytree(REPO / "configs" / "examples", work / "configs" / "examples")
    return work


def _run(command: str, cwd: Path, threads: str | None = "1") -> subprocess.CompletedProcess[str]:
    argv = shlex.split(command)
    if argv[0] == "bigft":
        argv = [sys.executable, "-m", "bigft", *argv[1:]]
    elif argv[0] == "python":
        argv[0] = sys.executable
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(HF_HUB_OFFLINE="1", COLUMNS="200")
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path: Path, tiny_base: Path) -> None:
    work = _scratch(tmp_path, tiny_base)
    ran = []
    for command in readme_commands():
        what, detail = COVERED[command]
        if what != RUN or command.startswith("make "):
            continue
        if command.startswith("bigft compare"):
            _two_runs_for_compare(work)
        for old, new in detail:
            command = command.replace(old, new)
        result = _run(command, work)
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr}"
        assert "Traceback" not in result.stderr, f"{command}\n{result.stderr}"
        ran.append((command, result))
    outputs = {command.split(" configs/")[0]: r.stdout for command, r in ran}
    assert re.search(r"lr:\s*0\.0001\b", outputs["bigft config show"])  # the override applied
    assert "train example 0" in outputs["bigft data preview"]  # rendered by the chat template
    assert "<|assistant|>" in outputs["bigft data preview"]
    final = work / "runs" / "llama3-chat" / "final"
    assert (final / "config.json").is_file()  # `bigft train` exported
    assert (work / "runs" / "llama3-chat" / "report" / "report.md").is_file()
    assert (work / "cmp").is_dir() and any((work / "cmp").iterdir())
    for run in ("digits-pretrain", "digits-transfer", "digits-clip"):
        assert (work / "runs" / run / "final" / "config.json").is_file(), run
    for export in ("llama3-chat-nf4", "llama3-chat-gguf", "llama3-chat-2of4"):
        assert (work / "exports" / export / "compression_report.json").is_file() or any(
            (work / "exports" / export).glob("*.gguf")
        ), export


def _two_runs_for_compare(work: Path) -> None:
    """`bigft compare runs/lr-1e-4 runs/lr-2e-4 --metric eval_accuracy`: two runs whose
    evaluations record that metric, written as a run writes metrics.jsonl."""
    for name, accuracy in (("lr-1e-4", 0.61), ("lr-2e-4", 0.74)):
        run = work / "runs" / name
        run.mkdir(parents=True, exist_ok=True)
        records = [
            {"step": 1, "loss": 1.0, "lr": 1e-4},
            {"step": 2, "split": "validation", "eval_loss": 0.9, "eval_accuracy": accuracy},
        ]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (run / "summary.json").write_text(json.dumps({"steps": 2}))


@pytest.mark.slow
def test_readme_demo_runs(tmp_path: Path) -> None:
    """`make demo` is `python -m bigft demo` (test_make_targets...): run it with fewer
    steps and check that it plans, trains, evaluates and exports, on one compute thread
    when OMP_NUM_THREADS does not say otherwise."""
    out = tmp_path / "demo"
    result = _run(
        f"bigft demo --output-dir {out} train.steps=60 eval.every_steps=30 "
        "checkpoint.every_steps=30",
        tmp_path,
        threads=None,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["exact_match_before"] == 0.0
    assert (out / "final" / "config.json").is_file()
    shown = result.stdout + result.stderr
    assert "plan" in shown and "exact match 0.0% -> " in shown
    assert re.search(r"compute threads[\s│|]+1 \(set OMP_NUM_THREADS", shown)


def test_the_demo_config_previews_before_the_demo_ran(tmp_path: Path) -> None:
    """`bigft data preview bigft/demo_data/demo.yaml`: its base model is made by `bigft
    demo`; the preview says so and uses a fresh one instead of asking the hub for it."""
    result = _run(f"bigft data preview {REPO / 'bigft' / 'demo_data' / 'demo.yaml'} -n 1", tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "made by `bigft demo`" in result.stdout
    assert "removed from train: nothing" in result.stdout
    assert not list(tmp_path.iterdir())  # nothing left behind in the working directory
