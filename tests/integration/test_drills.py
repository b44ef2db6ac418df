"""Reliability drills: what a long run meets at scale, made to happen on a tiny model.

NaN losses (on one rank), SIGKILL at random moments and in the middle of a checkpoint
write, a full disk, an unwritable output_dir, pickled weights and checkpoint-shipped code.
Failures are injected with the test hooks of `bigft.faults` (environment variables), or
by patching a write in-process. Every run is fp32 on CPU with one thread per process, so
"equal weights" below means bitwise equal.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from bigft.commands import app
from bigft.config import ModelConfig
from bigft.config_io import load_config
from bigft.engine import checkpoint as ckpt
from bigft.engine import resume as ckpt_resume
from bigft.engine import storage as ckpt_storage
from bigft.errors import BigftError, ModelError, TrainingError
from bigft.faults import CRASH_IN_SAVE, NONFINITE_RANK, NONFINITE_STEPS
from bigft.loop.setup import setup
from bigft.loop.train import train
from bigft.model.load import load_model
from bigft.tracking import read_metrics
from tests.helpers import alpaca_rows, write_config, write_jsonl


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("drill-data") / "train.jsonl", alpaca_rows(96))


def config(tmp_path: Path, tiny_base: Path, data_file: Path, *overrides: str) -> Any:
    """A loaded config for an in-process run in tmp_path/out."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_config(tmp_path / "cfg.yaml", tiny_base, data_file)
    return load_config(path, [f"output_dir={tmp_path / 'out'}", *overrides])


def step_dir(out: Path, step: int) -> Path:
    return ckpt.checkpoint_root(out) / f"step-{step:08d}"


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def same_tensors(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def adam_moments(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path / "optimizer.bin", weights_only=True)["state"]
    return {f"{i}.{k}": v for i, s in state.items() for k, v in s.items() if k != "step"}


def bigft(*args: str | Path) -> list[str]:
    """The command line of a `bigft` subprocess."""
    return [sys.executable, "-m", "bigft", *map(str, args)]


def cli_error(args: list[str]) -> tuple[int, list[str]]:
    result = CliRunner().invoke(app, args)
    assert "Traceback" not in result.output
    return result.exit_code, [line for line in result.stderr.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------
# Non-finite loss: skip the update, or stop with a checkpoint of the unchanged state.


def test_nonfinite_step_is_skipped_and_training_goes_on(
    tiny_base: Path, data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(NONFINITE_STEPS, "3")
    cfg = config(
        tmp_path,
        tiny_base,
        data_file,
        "train.steps=10",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=20",
        "schedule.name=linear",  # the schedule must move on past the skipped step
    )
    summary = train(setup(cfg))
    out = Path(cfg.output_dir)
    assert summary["skipped_steps"] == 1

    # The update of step 3 was not applied: weights and Adam moments as after step 2.
    assert same_tensors(weights(step_dir(out, 3)), weights(step_dir(out, 2)))
    assert same_tensors(adam_moments(step_dir(out, 3)), adam_moments(step_dir(out, 2)))
    assert not same_tensors(weights(step_dir(out, 4)), weights(step_dir(out, 3)))
    state = json.loads((step_dir(out, 3) / ckpt.STATE_FILE).read_text())
    assert state["counters"]["skipped_steps"] == 1
    assert state["scheduler"]["last_epoch"] == 3

    records = {r["step"]: r for r in read_metrics(out) if "loss" in r}
    assert records[3]["loss"] is None  # NaN, written as null (strict JSON)
    assert [records[s]["skipped_steps"] for s in (2, 3, 10)] == [0, 1, 1]
    later = [records[s]["loss"] for s in range(4, 11)]
    assert all(loss == loss for loss in later)
    first = (records[1]["loss"] + records[2]["loss"]) / 2
    assert sum(later[-3:]) / 3 < 0.9 * first, (first, later)


def test_fused_adamw_skips_a_nonfinite_step_on_the_device(
    tiny_base: Path, data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA, optim adamw is torch's fused AdamW and the skip decision reaches it as a
    `found_inf` tensor, as a GradScaler hands it, instead of the host holding back the
    step. The fused kernel runs on the CPU too: the same run, with the same outcome."""
    import bigft.optim

    monkeypatch.setattr(bigft.optim, "fused_adamw", lambda: True)
    seen: list[float | None] = []
    real_step = torch.optim.AdamW.step

    def recording_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        found_inf = getattr(self, "found_inf", None)
        seen.append(None if found_inf is None else float(found_inf))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    monkeypatch.setenv(NONFINITE_STEPS, "2")
    cfg = config(
        tmp_path,
        tiny_base,
        data_file,
        "train.steps=4",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=10",
    )
    summary = train(setup(cfg))
    out = Path(cfg.output_dir)
    assert summary["engine"]["optimizer"]["fused"] is True
    assert summary["skipped_steps"] == 1
    assert seen == [0.0, 1.0, 0.0, 0.0]  # every step went to the optimizer, one flagged
    assert same_tensors(weights(step_dir(out, 2)), weights(step_dir(out, 1)))
    assert same_tensors(adam_moments(step_dir(out, 2)), adam_moments(step_dir(out, 1)))
    steps = torch.load(step_dir(out, 2) / "optimizer.bin", weights_only=True)["state"]
    assert {float(s["step"]) for s in steps.values()} == {1.0}  # the kernel undid its count
    assert not same_tensors(weights(step_dir(out, 3)), weights(step_dir(out, 2)))


def test_too_many_skips_stop_the_run(
    tiny_base: Path, data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(NONFINITE_STEPS, "2,4")
    cfg = config(tmp_path, tiny_base, data_file, "train.steps=6", "train.max_skipped=1")
    with pytest.raises(TrainingError, match=r"step 4: .*more than train.max_skipped = 1"):
        train(setup(cfg))
    assert ckpt.latest_checkpoint(cfg.output_dir) == step_dir(Path(cfg.output_dir), 4)


def test_nonfinite_stop_checkpoints_and_exits_nonzero(
    tiny_base: Path, data_file: Path, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", tiny_base, data_file)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", NONFINITE_STEPS: "3"}
    args = ("train.steps=6", "train.nonfinite=stop", "checkpoint.every_steps=1")
    proc = subprocess.run(
        bigft("train", cfg, f"output_dir={out}", *args),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "step 3: non-finite loss" in errors[0] and "stopped (train.nonfinite" in errors[0]
    # The checkpoint written at the stop holds the state of step 2, and resumes after 3.
    assert ckpt.latest_checkpoint(out) == step_dir(out, 3)
    assert same_tensors(weights(step_dir(out, 3)), weights(step_dir(out, 2)))
    assert json.loads((step_dir(out, 3) / ckpt.STATE_FILE).read_text())["step"] == 3
    assert not (out / "summary.json").exists() and not (out / "final").exists()


# ---------------------------------------------------------------------------------------
# Two processes (DDP over gloo): a NaN on rank 1 only, then SIGKILLs at random moments.


def _launch_cmd(cfg: Path, out: Path, *overrides: str) -> list[str]:
    return bigft("launch", cfg, "--nproc", "2", f"output_dir={out}", *overrides)


DDP_RUN = ("train.steps=60", "checkpoint.every_steps=1")
DDP_ENV = {"OMP_NUM_THREADS": "1", NONFINITE_STEPS: "3", NONFINITE_RANK: "1"}


@pytest.fixture(scope="module")
def ddp_reference(
    tiny_base: Path, data_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    """An uninterrupted 2-process run whose step 3 is NaN on rank 1 only."""
    root = tmp_path_factory.mktemp("ddp-drill")
    cfg = write_config(root / "cfg.yaml", tiny_base, data_file)
    out = root / "reference"
    # keep_last does not change training; here it keeps steps 2-4 to compare.
    cmd = _launch_cmd(cfg, out, *DDP_RUN, "checkpoint.keep_last=100")
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, **DDP_ENV}, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return cfg, json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_nonfinite_on_one_rank_is_skipped_on_every_rank(
    ddp_reference: tuple[Path, dict[str, Any]],
) -> None:
    summary = ddp_reference[1]
    out = Path(summary["output_dir"])
    assert summary["world_size"] == 2 and summary["skipped_steps"] == 1
    digests = summary["weights_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # Rank 0's own loss was finite: it learned of rank 1's NaN through the step's reduce.
    records = {r["step"]: r for r in read_metrics(out) if "loss" in r}
    assert records[3]["loss"] is None and records[3]["skipped_steps"] == 1  # NaN -> null
    assert same_tensors(weights(step_dir(out, 3)), weights(step_dir(out, 2)))
    assert same_tensors(adam_moments(step_dir(out, 3)), adam_moments(step_dir(out, 2)))
    assert not same_tensors(weights(step_dir(out, 4)), weights(step_dir(out, 3)))
    first, last = [records[s]["loss"] for s in (1, 2)], [records[s]["loss"] for s in range(56, 61)]
    assert sum(last) / 5 < 0.8 * sum(first) / 2, (first, last)


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid`. torchrun starts its workers in sessions of their
    own, so killing the launcher's process group would leave the ranks running."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_everything(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the launcher, torchrun and both ranks at once: a node lost mid-step."""
    victims = [proc.pid, *_descendants(proc.pid)]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = [p for p in victims if _alive(p)]
        if not alive:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes survived SIGKILL: {alive}")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _latest_step(out: Path) -> int:
    latest = ckpt.latest_checkpoint(out)
    return int(latest.name.split("-")[1]) if latest is not None else 0


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bitwise_equal(
    ddp_reference: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    cfg, reference = ddp_reference
    out = tmp_path / "killed"
    rng = random.Random(20261130)
    points = sorted(rng.sample(range(6, 50), 2))
    print(f"kill after checkpoints of steps {points}")
    env = {**os.environ, **DDP_ENV}
    resumed_from = 0
    for point in points:
        proc = subprocess.Popen(
            _launch_cmd(cfg, out, *DDP_RUN),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while _latest_step(out) < max(point, resumed_from + 1):
                assert proc.poll() is None, "the run ended before the kill point"
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.3))  # a few steps on: mid-step or mid-save
        finally:
            _kill_everything(proc)
        step = _latest_step(out)
        leftovers = sorted(p.name for p in ckpt.checkpoint_root(out).glob("*.tmp"))
        print(f"killed at step >= {point}: resumes from step {step}, partial: {leftovers}")
        assert resumed_from < step < 60 and not (out / "summary.json").exists()
        resumed_from = step

    proc_done = subprocess.run(
        _launch_cmd(cfg, out, *DDP_RUN), capture_output=True, text=True, env=env, timeout=600
    )
    assert proc_done.returncode == 0, proc_done.stderr[-4000:]
    said = " ".join(proc_done.stderr.split())  # the console wraps long lines
    assert "resumed from" in said and f"at step {resumed_from}" in said
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 60
    assert summary["skipped_steps"] == 1  # the skip before the kills is remembered
    assert summary["weights_sha256_per_rank"] == reference["weights_sha256_per_rank"]
    assert not list(ckpt.checkpoint_root(out).glob("*.tmp"))

    # Steps re-run after each resume replace the killed run's records: the log reads like
    # the uninterrupted run's, loss for loss.
    def losses(run_dir: Path) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]

    assert [s for s, _ in losses(out)] == list(range(1, 61))
    got, want = losses(out), losses(Path(reference["output_dir"]))
    assert [(s, v) for s, v in got if v == v] == [(s, v) for s, v in want if v == v]


# ---------------------------------------------------------------------------------------
# A process that dies inside a checkpoint write.


def test_kill_during_checkpoint_write(tiny_base: Path, data_file: Path, tmp_path: Path) -> None:
    run_args = (
        "train.steps=6",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=10",
        "schedule.name=cosine",  # resume must restore the schedule to match exactly
        "schedule.warmup_steps=1",
    )
    crashed = tmp_path / "crashed"
    cfg_file = write_config(tmp_path / "cfg.yaml", tiny_base, data_file)
    proc = subprocess.run(
        bigft("train", cfg_file, f"output_dir={crashed}", *run_args),
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", CRASH_IN_SAVE: "4"},
        timeout=300,
    )
    assert proc.returncode == 137, proc.stderr[-3000:]
    partial = ckpt.checkpoint_root(crashed) / "step-00000004.tmp"
    assert (partial / "model.safetensors").is_file()  # the engine's files were written...
    assert not (partial / ckpt.STATE_FILE).exists()  # ...the marker of completeness not
    assert ckpt_resume.resolve_resume("auto", crashed) == step_dir(crashed, 2)
    assert not (step_dir(crashed, 2) / "custom_checkpoint_0.pkl").exists()

    straight_cfg = config(tmp_path / "straight", tiny_base, data_file, *run_args)
    train(setup(straight_cfg))
    straight = Path(straight_cfg.output_dir)
    # The previous checkpoint is intact: identical to the uninterrupted run's step 2.
    assert same_tensors(weights(step_dir(crashed, 2)), weights(step_dir(straight, 2)))

    run = setup(config(tmp_path, tiny_base, data_file, f"output_dir={crashed}", *run_args))
    assert run.state.step == 2 and not partial.exists()
    summary = train(run)
    assert summary["steps"] == 6
    assert same_tensors(weights(crashed / "final"), weights(straight / "final"))
    assert not list(ckpt.checkpoint_root(crashed).glob("*.tmp"))


def test_leftovers_of_a_killed_save_are_cleaned(tmp_path: Path) -> None:
    """step-N.tmp is removed; step-N.old (a complete checkpoint being replaced when the
    kill came) is put back when its replacement never landed."""

    class OneProcess:
        is_main_process = True

        def wait_for_everyone(self) -> None:
            pass

    root = ckpt.checkpoint_root(tmp_path)
    for name in ("step-00000004.tmp", "step-00000006.old", "step-00000002", "step-00000002.old"):
        (root / name).mkdir(parents=True)
        (root / name / ckpt.STATE_FILE).write_text("{}")
    notes = ckpt.clean_partial(OneProcess(), tmp_path)  # type: ignore[arg-type]
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000006"]
    assert len(notes) == 3 and ckpt.latest_checkpoint(tmp_path) == root / "step-00000006"


# ---------------------------------------------------------------------------------------
# Disk: unwritable output_dir, not enough space, a write that fails half-way.


def test_unwritable_output_dir_fails_before_training(
    tiny_base: Path, data_file: Path, tmp_path: Path
) -> None:
    # A path under a regular file cannot be created, even by root (who ignores modes).
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = write_config(tmp_path / "cfg.yaml", tiny_base, data_file)
    code, lines = cli_error(["train", str(cfg), f"output_dir={blocker / 'out'}"])
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: output_dir") and "Not a directory" in lines[0]


def test_not_enough_disk_space_fails_before_writing(
    tiny_base: Path, data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ckpt_storage, "disk_free", lambda path: 100 * 1024)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_base, data_file)
    code, lines = cli_error(["train", str(cfg)])
    assert code == 2 and len(lines) == 1, lines
    # 86,848 fp32 parameters: 339.2 KiB of weights, twice that of Adam moments.
    assert (
        "100.0 KiB free, but a checkpoint (weights 339.2 KiB + optimizer state 678.5 KiB) "
        "and the final export (339.2 KiB) need about 1.3 MiB" in lines[0]
    )
    assert not (tmp_path / "out").exists()


def test_disk_full_during_checkpoint_leaves_no_partial(
    tiny_base: Path, data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if "step-00000004.tmp" in str(f):  # the optimizer file, after the weights
            Path(f).write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    cfg = config(tmp_path, tiny_base, data_file, "train.steps=6", "checkpoint.every_steps=2")
    with pytest.raises(TrainingError, match="checkpoint step 4: .*No space left on device"):
        train(setup(cfg))
    out = Path(cfg.output_dir)
    assert [p.name for p in ckpt.checkpoint_root(out).iterdir()] == ["step-00000002"]
    assert ckpt.latest_checkpoint(out) == step_dir(out, 2)


# ---------------------------------------------------------------------------------------
# Security: no pickled weights unless allowed, no checkpoint-shipped code unless trusted.


@pytest.fixture
def pickled_base(tiny_base: Path, tmp_path: Path) -> Path:
    """The tiny base with its weights as pytorch_model.bin only."""
    path = tmp_path / "pickled"
    shutil.copytree(tiny_base, path)
    (path / "model.safetensors").unlink()
    torch.save(load_file(tiny_base / "model.safetensors"), path / "pytorch_model.bin")
    return path


def test_pickled_model_is_refused_unless_allowed(
    pickled_base: Path, tiny_base: Path, data_file: Path, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", tiny_base, data_file)
    code, lines = cli_error(["train", str(cfg), f"model.name_or_path={pickled_base}"])
    assert code == 2 and len(lines) == 1, lines
    assert "weights only as a pickle (pytorch_model.bin)" in lines[0]
    assert "save_pretrained" in lines[0] and "model.allow_pickle=true" in lines[0]
    assert not (tmp_path / "out").exists()

    model = load_model(ModelConfig(name_or_path=str(pickled_base), allow_pickle=True))
    expected = load_file(tiny_base / "model.safetensors")
    assert same_tensors({k: v for k, v in model.state_dict().items() if k in expected}, expected)


def test_checkpoint_with_pickled_weights_is_refused_unless_allowed(
    tiny_base: Path, data_file: Path, tmp_path: Path
) -> None:
    args = ("train.steps=4", "checkpoint.every_steps=2")
    cfg = config(tmp_path, tiny_base, data_file, *args)
    train(setup(cfg), stop_after=2)
    saved = step_dir(Path(cfg.output_dir), 2)
    torch.save(weights(saved), saved / "pytorch_model.bin")
    (saved / "model.safetensors").unlink()
    with pytest.raises(BigftError, match=r"pytorch_model.bin.*model.allow_pickle=true"):
        setup(cfg)
    run = setup(config(tmp_path, tiny_base, data_file, *args, "model.allow_pickle=true"))
    assert run.state.step == 2


def _with_remote_code(tiny_base: Path, root: Path, model_type: str) -> tuple[Path, Path]:
    """A copy of the tiny base whose config.json points at custom code (auto_map); the
    code leaves a marker file if it ever runs."""
    path = root / f"remote-{model_type}"
    shutil.copytree(tiny_base, path)
    marker = root / f"ran-{model_type}"
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "custom.Cfg", "AutoModelForCausalLM": "custom.Model"}
    (path / "config.json").write_text(json.dumps(config))
    (path / "custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        f"class Cfg(LlamaConfig):\n    model_type = {model_type!r}\n"
        "class Model(LlamaForCausalLM):\n    config_class = Cfg\n"
    )
    return path, marker


def test_checkpoint_code_does_not_run_without_trust_remote_code(
    tiny_base: Path, tmp_path: Path
) -> None:
    # An architecture transformers does not know: only the shipped code could load it.
    path, marker = _with_remote_code(tiny_base, tmp_path, "custom_llama")
    with pytest.raises(ModelError, match=r"ships its own modelling code.*trust_remote_code=true"):
        load_model(ModelConfig(name_or_path=str(path)))
    assert not marker.exists()
    # A known architecture with an auto_map: transformers' own class, the code never runs.
    path, marker = _with_remote_code(tiny_base, tmp_path, "llama")
    model = load_model(ModelConfig(name_or_path=str(path)))
    assert type(model).__module__.startswith("transformers.") and not marker.exists()
