"""bigft installed from its wheel, as `pip install bigft` users get it: no checkout around.

The wheel is built from a copy of the package's sources (so the build writes nothing into
the checkout), installed into a fresh virtual environment that sees this interpreter's
site-packages for torch and the other dependencies, and run from a directory outside the
checkout: every file it needs must come from the installed package.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.slurm.test_render import run_bash, stubs

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def run(*argv: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    # No PYTHONPATH: nothing may lead the installed bigft back to the checkout.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with bigft installed from a freshly built wheel."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(REPO / "bigft", src / "bigft", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    build = ("-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", work / "dist", ".")
    done = run(sys.executable, *build, cwd=src)
    assert done.returncode == 0, done.stderr[-3000:]
    [wheel] = (work / "dist").glob("bigft-*.whl")
    env_dir = work / "venv"
    done = run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", env_dir,
               cwd=work)  # fmt: skip
    assert done.returncode == 0, done.stderr
    # pip comes from the system site-packages and installs into the venv that runs it.
    done = run(env_dir / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index",
               "-q", wheel, cwd=work)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return env_dir


def test_the_venv_runs_the_wheel_not_the_checkout(venv: Path, tmp_path: Path) -> None:
    done = run(venv / "bin" / "python", "-c", "import bigft; print(bigft.__file__)", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    package = Path(done.stdout.strip()).parent
    assert package.is_relative_to(venv), done.stdout
    # Every file of bigft/templates/ was installed (a new one needs a package-data glob).
    source = REPO / "bigft" / "templates"
    for path in source.rglob("*"):
        if path.is_file():
            installed = package / "templates" / path.relative_to(source)
            assert installed.read_bytes() == path.read_bytes(), path


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_slurm_render_from_an_installed_wheel(venv: Path, tmp_path: Path, launcher: str) -> None:
    work = tmp_path / "elsewhere"  # no slurm/ or launch/ folder here
    work.mkdir()
    config = {
        "model": {"name_or_path": "some/model"},
        "data": {"train": "train.jsonl"},
        "slurm": {"launcher": launcher, "env": {"OMP_NUM_THREADS": "4"}},
        "output_dir": "run",
    }
    if launcher == "accelerate":  # as the README writes it, relative to a checkout
        config["slurm"]["accelerate_config"] = "launch/accelerate/zero3.yaml"
    (work / "cfg.yaml").write_text(yaml.safe_dump(config))
    done = run(venv / "bin" / "bigft", "slurm", "render", "cfg.yaml", "--nodes", "2",
               "--gpus-per-node", "8", cwd=work)  # fmt: skip
    assert done.returncode == 0, done.stderr

    job_dir = work / "run" / "slurm"
    text = (job_dir / "job.sbatch").read_text()
    assert done.stdout == text
    assert "{{" not in text and "{%" not in text
    assert text.startswith("#!/bin/bash\n") and text.rstrip().endswith('exit "$status"')
    assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=8" in text
    exports = dict(re.findall(r"^export (\w+)=(.*)$", text, re.MULTILINE))
    assert shlex.split(exports["BIGFT_PYTHON"]) == [str(venv / "bin" / "python")]
    assert shlex.split(exports["BIGFT_LAUNCHER"]) == [launcher]
    assert (job_dir / "node.sh").read_bytes() == (REPO / "launch" / "slurm_node.sh").read_bytes()
    if launcher == "accelerate":
        [accelerate] = shlex.split(exports["BIGFT_ACCELERATE_CONFIG"])
        shipped = REPO / "launch" / "accelerate" / "zero3.yaml"
        assert Path(accelerate).read_bytes() == shipped.read_bytes()
    else:
        assert "BIGFT_ACCELERATE_CONFIG" not in exports

    # The batch script, run as Slurm would (stub srun), starts the node script it names.
    bin_dir, log = stubs(tmp_path)
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "n[1-2]"}
    env["SLURM_CPUS_PER_TASK"] = "64"  # Slurm sets it from #SBATCH --cpus-per-task
    assert "#SBATCH --cpus-per-task=64\n" in text  # 8 GPUs x 8 CPUs
    [srun] = run_bash(job_dir / "job.sbatch", work, bin_dir, log, **env)
    assert srun["argv"][-3:] == ["--cpus-per-task=64", "bash", str(job_dir / "node.sh")]
    assert srun["env"]["BIGFT_CONFIG"] == str(job_dir / "config.yaml")
