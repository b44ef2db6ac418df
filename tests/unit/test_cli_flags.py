"""Command flags and process start-up: a value torchrun, the planner or sbatch would
reject is one line naming the flag (exit 2, nothing written); an engine that needs a
launcher says how to launch; workers import the real bigft whatever the directory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import bigft
from bigft.commands import app
from bigft.engine.launcher import isolated_workers
from bigft.errors import BigftError
from tests.helpers import alpaca_rows, write_config, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def one_line_error(args: list[str]) -> str:
    """Run the CLI; assert exit code 2 and a single `error:` line; return that line."""
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A valid config whose run directory does not exist yet."""
    path = tmp_path / "cfg.yaml"
    config = {
        "model": {"name_or_path": "some/model"},
        "data": {"train": "train.jsonl"},
        "output_dir": str(tmp_path / "out"),
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nproc", "0"], r"--nproc 0: must be at least 1"),
        (["--nproc", "-2"], r"--nproc -2: must be at least 1"),
        (["--nnodes", "0"], r"--nnodes 0: must be at least 1"),
        (["--nnodes", "2", "--node-rank", "2"], r"--node-rank 2: must be from 0 to 1 \(--nnodes"),
        (["--node-rank", "-1"], r"--node-rank -1: must be from 0 to 0"),
        (["--master-port", "0"], r"--master-port 0: must be a TCP port from 1 to 65535"),
        (["--master-port", "65536"], r"--master-port 65536: must be a TCP port from 1 to 65535"),
    ],
)
def test_launch_flags(config: Path, flags: list[str], message: str) -> None:
    line = one_line_error(["launch", str(config), *flags, "--dry-run"])
    assert re.search(rf"^error: {message}", line), line


def test_slurm_mem_sbatch_would_refuse(config: Path, tmp_path: Path) -> None:
    """sbatch --mem: a whole number with an optional K/M/G/T suffix; 0 = all memory."""
    for mem in ("1.5G", "480GB", "-1", "abc", "G", ""):
        for command in ("render", "submit"):
            line = one_line_error(["slurm", command, str(config), f"--mem={mem}"])
            assert line.startswith(f"error: --mem '{mem}': not a memory size sbatch accepts; ")
            assert "e.g. 480G, or 0 for all of each node's memory" in line
    assert not (tmp_path / "out").exists()
    for mem in ("0", "480G", "4096", "512m", "2T"):
        result = CliRunner().invoke(app, ["slurm", "render", str(config), "--mem", mem])
        assert result.exit_code == 0, result.output
        assert f'#SBATCH --mem="{mem}"' in result.stdout


def test_sweep_max_parallel(config: Path, tmp_path: Path) -> None:
    args = ["slurm", "sweep", str(config), "--grid", "optim.lr=1e-4,2e-4", "--dry-run"]
    line = one_line_error([*args, "--max-parallel", "0"])
    assert line == "error: --max-parallel 0: must be at least 1"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3", "fsdp2"])
def test_engine_that_needs_a_launcher_says_how_to_launch(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    """One plain process: DeepSpeed and FSDP2 crash in accelerate (CPU) or run without
    the engine (FSDP2 on a GPU); the error repeats the user's command under bigft launch."""
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(8))
    cfg = write_config(tmp_path / "cfg.yaml", tiny_base, data)
    override = f"parallel.strategy={strategy}"
    line = one_line_error(["train", str(cfg), override])
    assert line == (
        f"error: parallel.strategy {strategy} needs a distributed launcher, even for one "
        f"process: run `bigft launch {cfg} {override} --nproc N` (N processes per node, one "
        "per GPU; 1 is fine), or set parallel.strategy=ddp for a plain single-process run"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="-P and PYTHONSAFEPATH need 3.11")
def test_launch_runs_torchrun_and_workers_without_the_working_directory(config: Path) -> None:
    result = CliRunner().invoke(app, ["launch", str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"$ {sys.executable} -P -m torch.distributed.run --nproc_per_node=1" in result.stderr
    flags, env = isolated_workers(Path("/"), (3, 11))
    assert flags == ["-P"] and env["PYTHONSAFEPATH"] == "1"


def test_python_310_refuses_a_directory_that_shadows_bigft(tmp_path: Path) -> None:
    (tmp_path / "bigft").mkdir()
    with pytest.raises(BigftError, match=r"/bigft would be imported by the workers' `python -m"):
        isolated_workers(tmp_path, (3, 10))
    # the checkout that holds the running package is bigft itself, not a shadow
    checkout = Path(bigft.__file__).resolve().parents[1]
    assert isolated_workers(checkout, (3, 10)) == ([], {})


def test_slurm_node_script_keeps_the_working_directory_off_sys_path(tmp_path: Path) -> None:
    from tests.slurm.test_render import run_bash, stubs

    bin_dir, log = stubs(tmp_path)
    for launcher in ("torchrun", "accelerate"):
        run_bash(
            REPO / "bigft" / "templates" / "launch" / "slurm_node.sh", tmp_path, bin_dir, log,
            SLURM_JOB_ID="5", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="nodeA",
            SLURM_NODEID="0", SLURMD_NODENAME="nodeA", BIGFT_CONFIG="/c.yaml",
            BIGFT_LAUNCHER=launcher, BIGFT_PYTHON="python",
        )  # fmt: skip
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    pythons = [c for c in calls if c["prog"] == "python"]
    assert len(pythons) == 2
    assert all(c["env"].get("PYTHONSAFEPATH") == "1" for c in pythons)


def test_slurm_job_from_an_uninstalled_checkout_is_handed_the_checkout(
    config: Path, tmp_path: Path
) -> None:
    """Jobs run Python with PYTHONSAFEPATH=1: a checkout that `python -m bigft` found as
    the working directory reaches the job through PYTHONPATH; an installed bigft, or one
    on PYTHONPATH already, adds nothing."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    render = [sys.executable, "-m", "bigft", "slurm", "render", str(config)]
    here = subprocess.run(render, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert here.returncode == 0, here.stderr
    assert f"export PYTHONPATH={REPO}\n" in here.stdout
    elsewhere = subprocess.run(
        render, cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert "PYTHONPATH" not in elsewhere.stdout


@pytest.mark.slow
@pytest.mark.skipif(sys.version_info < (3, 11), reason="3.10 refuses such a directory")
def test_launch_from_a_directory_holding_a_bigft_folder(tiny_base: Path, tmp_path: Path) -> None:
    """`bigft launch` (the console script) started where `bigft/` and `torch/` folders
    print SHADOW and exit: torchrun and its worker still import the real packages. One
    FSDP2 process, as the one-process error advises (`--nproc 1`)."""
    work = tmp_path / "work"
    for name in ("bigft", "torch"):
        (work / name).mkdir(parents=True)
        for module in ("__init__.py", "__main__.py"):
            (work / name / module).write_text('print("SHADOW")\nraise SystemExit(1)\n')
    entry = tmp_path / "bin" / "bigft"  # what pip's console script does
    entry.parent.mkdir()
    entry.write_text("from bigft.commands import main\n\nmain()\n")
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(16))
    cfg = write_config(tmp_path / "cfg.yaml", tiny_base, data)
    out = tmp_path / "out"
    run = [
        "train.steps=1",
        "data.split.train=1.0",
        "data.split.validation=0",
        "checkpoint.export=false",
        "parallel.strategy=fsdp2",
        f"output_dir={out}",
    ]
    # The checkout reaches the launcher through PYTHONPATH, as an install would.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("PYTHONSAFEPATH", None)
    proc = subprocess.run(
        [sys.executable, str(entry), "launch", str(cfg), *run, "--nproc", "1"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "SHADOW" not in proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1
    assert summary["engine"]["distributed_type"] == "FSDP"
    assert summary["engine"]["world_size"] == 1
