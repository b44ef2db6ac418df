"""Rendering without a cluster: quoting fuzz, node rank at run time, sweeps, requeue rules,
CPU requests, the files a job carries, and the repository's copies of the shipped files.

The batch script and the node script are executed by bash with stub `srun`, `scontrol`,
`scancel` and `python` programs that record what they were given, so these tests see what
a real job would run without needing Slurm.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

from bigft.config_io import load_config
from bigft.errors import ConfigError
from bigft.slurm import job as slurm_job
from bigft.slurm import queue as slurm_queue
from bigft.slurm import sweep as slurm_sweep

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "slurm" / "examples"
EXAMPLE_CONFIG = EXAMPLES / "llama3-8b-2x8xh100.yaml"
EXAMPLE_SCRIPT = EXAMPLES / "llama3-8b-2x8xh100.sbatch"

# Values that would change what a shell script does if pasted into it unquoted.
NASTY = [
    "two words",
    "it's",
    'say "hi"',
    "$(touch pwned-dollar)",
    "`touch pwned-tick`",
    "x; touch pwned-semi",
    "x && touch pwned-and | cat > pwned-pipe",
    "back\\slash \\$HOME \\",
    "%j 100%",
    "* ? [a] ~ #hash !bang {a,b} > pwned-redirect",
]

STUB = """#!{python}
import json, os, sys
name = os.path.basename(sys.argv[0])
if name == "scontrol" and sys.argv[1:3] == ["show", "hostnames"]:
    print("nodeA"); print("nodeB"); sys.exit(0)
with open(os.environ["STUB_LOG"], "a") as fh:
    fh.write(json.dumps({{"prog": name, "argv": sys.argv[1:], "env": dict(os.environ)}}) + "\\n")
"""


def stubs(tmp_path: Path) -> tuple[Path, Path]:
    """A bin/ with recording stubs of srun, scontrol, scancel, python; and their log."""
    bin_dir = tmp_path / "stub-bin"
    bin_dir.mkdir()
    for name in ("srun", "scontrol", "scancel", "python"):
        path = bin_dir / name
        path.write_text(STUB.format(python=sys.executable))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bin_dir, tmp_path / "stub-log.jsonl"


def run_bash(script: Path, cwd: Path, bin_dir: Path, log: Path, **env: str) -> list[dict]:
    full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log), **env}
    done = subprocess.run(
        ["bash", str(script)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def sbatch_args(line: str) -> list[str]:
    """Split an #SBATCH line as sbatch does: "..." groups, backslash escapes one char."""
    args: list[str] = []
    current, quoted, escaped, started = "", False, False, False
    for ch in line.removeprefix("#SBATCH"):
        if escaped:
            current, escaped, started = current + ch, False, True
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted, started = not quoted, True
        elif ch.isspace() and not quoted:
            if started:
                args.append(current)
            current, started = "", False
        else:
            current, started = current + ch, True
    return [*args, current] if started else args


def write_yaml(path: Path, slurm_section: dict, output_dir: Path) -> Path:
    config = {
        "model": {"name_or_path": "some/model"},
        "data": {"train": "train.jsonl"},
        "slurm": slurm_section,
        "output_dir": str(output_dir),
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("value", NASTY)
def test_no_value_can_change_what_the_script_does(tmp_path: Path, value: str) -> None:
    bin_dir, log = stubs(tmp_path)
    weird_dir = tmp_path / value.replace("/", "_")  # a directory named like the value
    weird_dir.mkdir()
    setup = weird_dir / "setup.sh"
    setup.write_text("export SOURCED_SETUP=yes\n")
    cfg_path = write_yaml(
        weird_dir / "cfg.yaml",
        {
            "job_name": value, "partition": value, "account": value, "qos": value,
            "constraint": value, "nccl_socket_ifname": value,
            "nccl_debug": value, "env": {"WEIRD": value}, "setup_script": str(setup),
            "python": value, "sbatch_extra": [f"--comment={value}"],
        },
        weird_dir / "run",
    )  # fmt: skip
    cfg = slurm_job.load_job_config(cfg_path, [])
    script = slurm_job.prepare_job(cfg, cfg_path)
    text = script.read_text()

    directives = [sbatch_args(line) for line in text.splitlines() if line.startswith("#SBATCH")]
    flat = dict(arg.split("=", 1) for args in directives for arg in args if "=" in arg)
    for option in ("job-name", "partition", "account", "qos", "constraint", "comment"):
        assert flat[f"--{option}"] == value, option
    assert flat["--output"] == str(weird_dir / "run" / "slurm").replace("%", "%%") + "/job-%j.out"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0

    sandbox = tmp_path / "cwd"
    sandbox.mkdir()
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "n[1-2]"}
    calls = run_bash(script, sandbox, bin_dir, log, **env)
    assert not list(sandbox.iterdir()), "a value ran as a command"
    [srun] = [c for c in calls if c["prog"] == "srun"]
    assert srun["argv"][-2:] == ["bash", str(weird_dir / "run" / "slurm" / "node.sh")]
    assert srun["env"]["WEIRD"] == value
    assert srun["env"]["NCCL_SOCKET_IFNAME"] == value
    assert srun["env"]["BIGFT_PYTHON"] == value
    assert srun["env"]["BIGFT_CONFIG"] == str(weird_dir / "run" / "slurm" / "config.yaml")
    assert srun["env"]["SOURCED_SETUP"] == "yes"
    assert load_config(srun["env"]["BIGFT_CONFIG"]).slurm.job_name == value


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_node_rank_is_read_on_each_node_at_run_time(tmp_path: Path, launcher: str) -> None:
    cfg_path = write_yaml(tmp_path / "cfg.yaml", {"nodes": 2, "launcher": launcher}, tmp_path)
    script = slurm_job.prepare_job(slurm_job.load_job_config(cfg_path, []), cfg_path)
    # The batch shell runs on the first node only: it must not decide any node's rank.
    assert "SLURM_NODEID" not in script.read_text()
    bin_dir, log = stubs(tmp_path)
    config = tmp_path / "a dir; $(x)" / "config.yaml"
    for node_id, name in enumerate(["nodeA", "nodeB"]):
        run_bash(
            script.parent / "node.sh", tmp_path, bin_dir, log,
            SLURM_JOB_ID="12345", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node[A-B]",
            SLURM_NODEID=str(node_id), SLURMD_NODENAME=name, SLURM_GPUS_ON_NODE="8",
            BIGFT_CONFIG=str(config), BIGFT_LAUNCHER=launcher, BIGFT_PYTHON="python",
        )  # fmt: skip
    calls = [c for c in map(json.loads, log.read_text().splitlines()) if c["prog"] == "python"]
    assert [c["env"]["NODE_RANK"] for c in calls] == ["0", "1"]
    assert {c["env"]["MASTER_ADDR"] for c in calls} == {"nodeA"}
    assert {c["env"]["MASTER_PORT"] for c in calls} == {str(20000 + 12345 % 20000)}
    for node_id, call in enumerate(calls):
        argv = call["argv"]
        assert argv[-4:] == ["-m", "bigft", "train", str(config)]
        if launcher == "torchrun":
            assert argv[:2] == ["-m", "torch.distributed.run"]
            assert argv[argv.index("--nproc-per-node") + 1] == "8"
            assert argv[argv.index("--rdzv-endpoint") + 1] == "nodeA:32345"
            host = "true" if node_id == 0 else "false"
            assert argv[argv.index("--rdzv-conf") + 1].startswith(f"is_host={host},")
        else:
            assert argv[argv.index("--machine_rank") + 1] == str(node_id)
            assert argv[argv.index("--num_processes") + 1] == "16"


def test_restart_guard_stops_a_job_that_keeps_coming_back(tmp_path: Path) -> None:
    cfg_path = write_yaml(tmp_path / "cfg.yaml", {"max_restarts": 2}, tmp_path)
    script = slurm_job.prepare_job(slurm_job.load_job_config(cfg_path, []), cfg_path)
    bin_dir, log = stubs(tmp_path)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log)}
    slurm_env = {"SLURM_JOB_ID": "9", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "n1"}
    for restarts, expected_rc in (("2", 0), ("3", 1)):
        done = subprocess.run(
            ["bash", str(script)],
            env={**env, **slurm_env, "SLURM_RESTART_COUNT": restarts},
            capture_output=True,
            text=True,
        )
        assert done.returncode == expected_rc, done.stderr
    assert "restarted 3 times (slurm.max_restarts = 2); giving up" in done.stderr
    assert len(log.read_text().splitlines()) == 1  # srun ran for restart 2 only


def test_example_is_up_to_date() -> None:
    """slurm/examples/*.sbatch is what the renderer makes of the example config."""
    assert EXAMPLE_SCRIPT.read_text() == render_example(), (
        "re-render with: python -m tests.slurm.test_render"
    )


def render_example() -> str:
    """The example as an installed bigft renders it (a checkout run from its root would
    add its own path to the job's PYTHONPATH)."""
    cfg = slurm_job.load_job_config(EXAMPLE_CONFIG, [])
    job_dir = Path(cfg.output_dir) / "slurm"
    with mock.patch.object(slurm_job, "checkout_on_path", lambda: None):
        return slurm_job.render_script(
            cfg,
            source=str(EXAMPLE_CONFIG.relative_to(EXAMPLES.parent.parent)),
            config=str(job_dir / "config.yaml"),
            node_script=str(job_dir / "node.sh"),
            log_path=f"{job_dir}/job-%j.out",
        )


def test_sweep_renders_one_array_with_a_config_per_point(tmp_path: Path) -> None:
    cfg_path = write_yaml(tmp_path / "cfg.yaml", {"nodes": 2}, tmp_path / "sweep")
    grid = ["optim.lr=1e-4,2e-4", "train.seed=1,2,3"]
    script, n = slurm_sweep.prepare_sweep(cfg_path, ["train.steps=5"], grid, {}, max_parallel=2)
    assert n == 6
    assert "#SBATCH --array=0-5%2" in script.read_text()
    tasks = json.loads((script.parent / "sweep.json").read_text())["tasks"]
    seen = set()
    for task in tasks:
        cfg = load_config(script.parent / task["config"])
        assert cfg.output_dir == str(tmp_path / "sweep" / f"task-{task['task']:03d}")
        assert cfg.train.steps == 5
        seen.add((cfg.optim.lr, cfg.train.seed))
    assert len(seen) == 6
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        slurm_sweep.prepare_sweep(cfg_path, [], ["optim.lr=fast,1e-4"], {})


def test_config_rejects_what_cannot_be_rendered(tmp_path: Path) -> None:
    for bad, match in [
        ({"job_name": "a\nrm -rf /"}, "single line"),
        ({"sbatch_extra": ["--x=1\nrm"]}, "single line"),
        ({"time": 3600}, "quoted string"),
        ({"time": "soon"}, "not a Slurm time"),
        ({"env": {"1BAD": "x"}}, "environment variable name"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(write_yaml(tmp_path / "cfg.yaml", bad, tmp_path))
    numbers = {"env": {"OMP_NUM_THREADS": 8, "X": True}}  # YAML scalars become strings
    env = load_config(write_yaml(tmp_path / "cfg.yaml", numbers, tmp_path)).slurm.env
    assert env == {"OMP_NUM_THREADS": "8", "X": "true"}
    cfg_path = write_yaml(tmp_path / "cfg.yaml", {"time": "00:05:00"}, tmp_path)
    with pytest.raises(ConfigError, match="signal_seconds"):
        slurm_job.prepare_job(slurm_job.load_job_config(cfg_path, []), cfg_path)
    with pytest.raises(ConfigError, match="--nodes"):
        slurm_job.load_job_config(cfg_path, [], {"nodes": 0})
    assert [slurm_job.time_seconds(t) for t in ("90", "1:30", "01:00:00", "1-2", "2-00:00:30")] == [
        5400,
        90,
        3600,
        93600,
        172830,
    ]


def test_after_stop_requeues_once_per_job(tmp_path: Path, monkeypatch) -> None:
    bin_dir, log = stubs(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("STUB_LOG", str(log))
    for name in ("SLURM_RESTART_COUNT", "LOCAL_RANK", "SLURM_NODEID"):
        monkeypatch.delenv(name, raising=False)
    stopped = {"stopped": "SIGUSR1"}
    assert not slurm_queue.after_stop(stopped)  # not under Slurm
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert not slurm_queue.after_stop(stopped)  # not a job bigft rendered
    monkeypatch.setenv("BIGFT_REQUEUE", "1")
    monkeypatch.setenv("BIGFT_MAX_RESTARTS", "2")
    assert not slurm_queue.after_stop({"steps": 10})  # finished normally
    assert not slurm_queue.after_stop({"stopped": "SIGTERM"})  # scancel / time limit: Slurm's call
    monkeypatch.setenv("SLURM_NODEID", "1")
    assert not slurm_queue.after_stop(stopped)  # not node 0
    monkeypatch.setenv("SLURM_NODEID", "0")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not slurm_queue.after_stop(stopped)  # not the node's main process
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert not slurm_queue.after_stop(stopped)  # max restarts reached
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert slurm_queue.after_stop(stopped)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["argv"] for c in calls] == [["requeue", "42"]]


@pytest.mark.parametrize(
    ("section", "cpus"),
    [
        ({"gpus_per_node": 8}, 64),  # 8 ranks x cpus_per_gpu 8
        ({"gpus_per_node": 4, "cpus_per_gpu": 12}, 48),
        ({"gpus_per_node": 8, "processes_per_node": 2}, 16),
        ({"gpus_per_node": 8, "cpus_per_task": 20}, 20),  # the user's value wins
        ({"processes_per_node": 3}, 3),  # CPU ranks: one core each
        ({"processes_per_node": 3, "cpus_per_task": 1}, 1),
        ({}, None),  # nothing known about the node: Slurm's default
    ],
)
def test_cpus_per_task_covers_every_rank_of_the_node(
    tmp_path: Path, section: dict, cpus: int | None
) -> None:
    cfg_path = write_yaml(tmp_path / "cfg.yaml", section, tmp_path / "run")
    script = slurm_job.prepare_job(slurm_job.load_job_config(cfg_path, []), cfg_path)
    text = script.read_text()
    requested = [line for line in text.splitlines() if "#SBATCH --cpus-per-task" in line]
    assert requested == ([f"#SBATCH --cpus-per-task={cpus}"] if cpus else [])
    # srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05): it is passed on.
    assert ('--cpus-per-task="$SLURM_CPUS_PER_TASK"' in text) == bool(cpus)
    # The frozen config keeps what the user wrote; the derived value lives in the script.
    frozen = load_config(script.parent / "config.yaml").slurm
    assert frozen.cpus_per_task == section.get("cpus_per_task")


@pytest.mark.parametrize("value", ["zero3", "zero3.yaml", "launch/accelerate/zero3.yaml"])
def test_shipped_accelerate_config_travels_with_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.chdir(tmp_path)  # not the checkout: no launch/ folder here
    section = {"launcher": "accelerate", "accelerate_config": value}
    cfg_path = write_yaml(tmp_path / "cfg.yaml", section, tmp_path / "run")
    script = slurm_job.prepare_job(slurm_job.load_job_config(cfg_path, []), cfg_path)
    copy = script.parent / "accelerate.yaml"
    assert f"export BIGFT_ACCELERATE_CONFIG={copy}\n" in script.read_text()
    assert copy.read_bytes() == (REPO / "launch" / "accelerate" / "zero3.yaml").read_bytes()


def test_own_accelerate_config_is_frozen_with_the_job(tmp_path: Path) -> None:
    own = tmp_path / "configs" / "my accelerate.yaml"
    own.parent.mkdir()
    own.write_text("distributed_type: MULTI_GPU\n")
    section = {"launcher": "accelerate", "accelerate_config": "my accelerate.yaml"}
    cfg_path = write_yaml(own.parent / "cfg.yaml", section, tmp_path / "run")
    script = slurm_job.prepare_job(slurm_job.load_job_config(cfg_path, []), cfg_path)
    own.write_text("edited after rendering\n")  # a queued job keeps what was rendered
    assert (script.parent / "accelerate.yaml").read_text() == "distributed_type: MULTI_GPU\n"
    section["accelerate_config"] = "missing.yaml"
    cfg_path = write_yaml(own.parent / "cfg.yaml", section, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"missing\.yaml.*zero3"):
        slurm_job.prepare_job(slurm_job.load_job_config(cfg_path, []), cfg_path)


def shipped_files() -> dict[Path, bytes]:
    """The files bigft installs with itself (bigft/templates/), by path under that folder."""
    root = REPO / "bigft" / "templates"
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_repository_copies_are_the_shipped_files() -> None:
    """slurm/job.sbatch.j2, launch/slurm_node.sh and launch/accelerate/*.yaml are copies of
    what bigft ships in bigft/templates/ (what it really uses), byte for byte."""
    shipped = shipped_files()
    assert {Path("slurm/job.sbatch.j2"), Path("launch/slurm_node.sh")} <= set(shipped)
    copies = {
        p.relative_to(REPO)
        for folder in ("slurm", "launch")
        for p in (REPO / folder).rglob("*")
        if p.is_file() and p.name != "README.md" and "examples" not in p.parts
    }
    assert copies == set(shipped)
    stale = sorted(
        str(path) for path, data in shipped.items() if (REPO / path).read_bytes() != data
    )
    assert not stale, (
        f"{stale} differ from bigft/templates/: edit the files in bigft/templates/, then "
        "copy them with: python -m tests.slurm.test_render"
    )


def test_cli_help_stays_light() -> None:
    code = "import sys, bigft.commands.root; assert not {'torch', 'jinja2'} & set(sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


if __name__ == "__main__":
    for path, data in shipped_files().items():
        (REPO / path).parent.mkdir(parents=True, exist_ok=True)
        (REPO / path).write_bytes(data)
        print(f"copied bigft/templates/{path} to {path}")
    EXAMPLE_SCRIPT.write_text(render_example())
    print(f"wrote {EXAMPLE_SCRIPT}")
