"""Resume and run-end safety on a tiny model: damaged checkpoints, lost RNG states, kills
at the end of a run, strict JSON, unwritable output_dir, nothing written before the
checks pass.

Every run is fp32 on CPU with one thread, so a resumed run's losses equal an
uninterrupted run's exactly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from bigft import errors
from bigft.commands import app
from bigft.config_io import load_config
from bigft.engine import checkpoint as ckpt
from bigft.engine import resume as ckpt_resume
from bigft.errors import ConfigError
from bigft.faults import CRASH_AT
from bigft.loop import setup as loop_setup
from bigft.loop.setup import setup
from bigft.loop.train import train
from bigft.tracking import MetricsLog, read_metrics
from tests.helpers import alpaca_rows, write_config, write_jsonl

# A run that checkpoints, evaluates the validation split on schedule and the test split
# at the end.
END_RUN = (
    "checkpoint.every_steps=3",
    "checkpoint.keep_last=10",
    "eval.every_steps=2",
    "data.split.train=0.7",
    "data.split.validation=0.2",
    "data.split.test=0.1",
)


class Killed(BaseException):
    """Stands for SIGKILL in-process: nothing in bigft catches it."""


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("resume-data") / "train.jsonl", alpaca_rows(96))


def cfg_file(root: Path, tiny_base: Path, data_file: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return write_config(root / "cfg.yaml", tiny_base, data_file)


def config(root: Path, tiny_base: Path, data_file: Path, *overrides: str) -> Any:
    """A loaded config for an in-process run in root/out."""
    path = cfg_file(root, tiny_base, data_file)
    return load_config(path, [f"output_dir={root / 'out'}", *overrides])


def quiet() -> Console:
    """A console whose text the test reads back (wide: one message, one line)."""
    return Console(file=io.StringIO(), width=1000)


def said(console: Console) -> str:
    return console.file.getvalue()  # type: ignore[attr-defined]


def step_dir(out: Path, step: int) -> Path:
    return ckpt.checkpoint_root(out) / f"step-{step:08d}"


def records(out: Path) -> list[tuple[int, str | None, float | None]]:
    """Every metrics record as (step, split, loss or eval_loss), in file order."""
    return [
        (r["step"], r.get("split"), r.get("loss", r.get("eval_loss"))) for r in read_metrics(out)
    ]


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(root.rglob("*"))
    }


def cli(*args: str | Path) -> tuple[int, list[str], str]:
    """`bigft` in-process: exit code, non-empty stderr lines, all output."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return result.exit_code, lines, result.output


def one_line_error(args: list[str | Path], pattern: str) -> str:
    code, lines, output = cli(*args)
    assert "Traceback" not in output, output
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------
# A kill at the end of a run: the resumed run's metrics.jsonl reads like an uninterrupted
# run's (each end-of-run record once).


@pytest.fixture(scope="module")
def uninterrupted(
    tiny_base: Path, data_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[int, tuple[list[Any], dict[str, Any]]]:
    """Records and summary of uninterrupted 6- and 7-step runs. At 6 the last checkpoint
    is the loop's (after the step-6 evaluation); at 7 the end of the run writes it."""
    found = {}
    for steps in (6, 7):
        root = tmp_path_factory.mktemp(f"straight-{steps}")
        summary = train(setup(config(root, tiny_base, data_file, f"train.steps={steps}", *END_RUN)))
        found[steps] = (records(root / "out"), summary)
    return found


def test_reference_runs_log_each_end_record_once(
    uninterrupted: dict[int, tuple[list[Any], dict[str, Any]]],
) -> None:
    six = [(step, split) for step, split, _ in uninterrupted[6][0]]
    assert six == [
        (1, None), (2, None), (2, "validation"), (3, None), (4, None), (4, "validation"),
        (5, None), (6, None), (6, "validation"), (6, "test"),
    ]  # fmt: skip
    seven = [(step, split) for step, split, _ in uninterrupted[7][0]]
    assert seven[-3:] == [(7, None), (7, "validation"), (7, "test")]


def _assert_like_uninterrupted(
    out: Path, summary: dict[str, Any], reference: tuple[list[Any], dict[str, Any]]
) -> None:
    want_records, want_summary = reference
    assert records(out) == want_records  # steps, splits and values; no record twice
    assert summary["steps"] == want_summary["steps"]
    assert summary["validation"]["eval_loss"] == want_summary["validation"]["eval_loss"]
    assert summary["test"]["eval_loss"] == want_summary["test"]["eval_loss"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["resume"]["step"] == want_summary["steps"]
    assert on_disk["resume"]["warnings"] == []


@pytest.mark.parametrize("steps", [6, 7])
def test_kill_after_the_final_evaluation_then_resume(
    steps: int,
    uninterrupted: dict[int, tuple[list[Any], dict[str, Any]]],
    tiny_base: Path,
    data_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Killed as the final model is exported: the final evaluations are in metrics.jsonl,
    summary.json is not written."""

    def killed(*args: Any, **kwargs: Any) -> None:
        raise Killed

    cfg = config(tmp_path, tiny_base, data_file, f"train.steps={steps}", *END_RUN)
    out = Path(cfg.output_dir)
    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "export_model", killed)
        with pytest.raises(Killed):
            train(setup(cfg))
    assert not (out / "summary.json").exists()
    assert records(out)[-1][:2] == (steps, "test")  # the kill came after the final records

    run = setup(cfg)
    assert run.state.step == steps
    _assert_like_uninterrupted(out, train(run), uninterrupted[steps])


@pytest.mark.parametrize("point", ["end-saved", "end-evaluated", "end-exported"])
def test_sigkill_in_the_end_phase_then_resume(
    point: str,
    uninterrupted: dict[int, tuple[list[Any], dict[str, Any]]],
    tiny_base: Path,
    data_file: Path,
    tmp_path: Path,
) -> None:
    """A real process death (exit 137, no cleanup) at each point of the end of a run."""
    args = ["train.steps=7", *END_RUN]
    path = cfg_file(tmp_path, tiny_base, data_file)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bigft", "train", str(path), f"output_dir={out}", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", CRASH_AT: point},
        timeout=300,
    )
    assert proc.returncode == 137, proc.stderr[-3000:]
    assert not (out / "summary.json").exists()
    assert ckpt.latest_checkpoint(out) == step_dir(out, 7)

    run = setup(load_config(path, [f"output_dir={out}", *args]))
    assert run.state.step == 7
    _assert_like_uninterrupted(out, train(run), uninterrupted[7])


def test_metrics_log_truncates_to_a_line_end_only(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, enabled=True)
    log.write({"step": 1, "loss": 1.0})
    size = log.size()
    log.write({"step": 2, "loss": 0.5})
    assert not log.truncate(size + 3)  # not the end of a line: not the file it saw
    assert not log.truncate(log.size() + 1)  # longer than the file
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert log.truncate(size) and [r["step"] for r in read_metrics(tmp_path)] == [1]


# ---------------------------------------------------------------------------------------
# RNG states: resumed anyway, with a warning on screen and in summary.json.


@pytest.mark.parametrize(
    ("damage", "word"), [("delete", "missing"), ("garbage", "unreadable"), ("empty", "unreadable")]
)
def test_resume_without_rng_state_warns_and_records_it(
    damage: str, word: str, tiny_base: Path, data_file: Path, tmp_path: Path
) -> None:
    cfg = config(tmp_path, tiny_base, data_file, "train.steps=4", "checkpoint.every_steps=2")
    train(setup(cfg), stop_after=2)
    out = Path(cfg.output_dir)
    rng = step_dir(out, 2) / "random_states_0.pkl"
    if damage == "delete":
        rng.unlink()
    else:
        rng.write_bytes(b"" if damage == "empty" else b"not a torch file")

    console = quiet()
    run = setup(cfg, console)
    assert run.state.step == 2
    text = said(console)
    warning = (
        rf"rng state {word}: {re.escape(str(rng))}; resumed anyway: "
        r".*will not match an uninterrupted run"
    )
    assert re.search(r"warning: " + warning, text), text
    train(run)
    resume = json.loads((out / "summary.json").read_text())["resume"]
    assert resume["from"] == str(step_dir(out, 2)) and resume["step"] == 2
    assert len(resume["warnings"]) == 1 and re.fullmatch(warning, resume["warnings"][0])


def test_rng_warning_is_carried_to_later_resumes(
    tiny_base: Path, data_file: Path, tmp_path: Path
) -> None:
    """A later resume from an intact checkpoint still says the run lost its RNG state."""
    cfg = config(tmp_path, tiny_base, data_file, "train.steps=6", "checkpoint.every_steps=2")
    train(setup(cfg), stop_after=2)
    out = Path(cfg.output_dir)
    (step_dir(out, 2) / "random_states_0.pkl").unlink()
    train(setup(cfg, quiet()), stop_after=4)
    run = setup(cfg, quiet())
    assert run.state.step == 4
    train(run)
    resume = json.loads((out / "summary.json").read_text())["resume"]
    assert resume["step"] == 4
    assert len(resume["warnings"]) == 1 and "rng state missing" in resume["warnings"][0]


# ---------------------------------------------------------------------------------------
# Damaged checkpoints: auto passes over them, an explicit one is an error, and nothing
# half-loaded is used.


@pytest.fixture
def two_checkpoints(tiny_base: Path, data_file: Path, tmp_path: Path) -> tuple[Any, Path]:
    """A run stopped at step 4, with whole checkpoints at steps 2 and 4."""
    cfg = config(tmp_path, tiny_base, data_file, "train.steps=6", "checkpoint.every_steps=2")
    train(setup(cfg), stop_after=4)
    out = Path(cfg.output_dir)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000002", "step-00000004"]
    return cfg, out


def _truncate(file: Path, size: int) -> None:
    with file.open("r+b") as fh:
        fh.truncate(size)


DAMAGE = {
    "optimizer missing": (lambda d: (d / "optimizer.bin").unlink(), r"optimizer\.bin is missing"),
    "state truncated": (
        lambda d: _truncate(d / "trainer_state.json", 20),
        r"trainer_state\.json is not valid JSON",
    ),
    "weights truncated": (
        lambda d: _truncate(d / "model.safetensors", 5000),
        r"model\.safetensors is truncated \(5000 bytes; its header declares \d+\)",
    ),
    "weights empty": (
        lambda d: _truncate(d / "model.safetensors", 0),
        r"model\.safetensors is empty \(0 bytes\)",
    ),
    "optimizer truncated": (
        lambda d: _truncate(d / "optimizer.bin", 5000),
        r"optimizer\.bin is truncated or corrupt",
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_auto_resume_passes_over_a_damaged_latest_checkpoint(
    damage: str, two_checkpoints: tuple[Any, Path]
) -> None:
    cfg, out = two_checkpoints
    spoil, problem = DAMAGE[damage]
    spoil(step_dir(out, 4))
    weights_2 = load_file(step_dir(out, 2) / "model.safetensors")

    console = quiet()
    run = setup(cfg, console)
    assert run.state.step == 2
    lines = [line for line in said(console).splitlines() if "damaged" in line]
    assert len(lines) == 1, said(console)
    assert re.search(
        rf"skipped the damaged checkpoint {re.escape(str(step_dir(out, 4)))}: {problem}.*; "
        r"resuming from step-00000002$",
        lines[0].rstrip(),
    ), lines[0]
    # The weights are step 2's: nothing of the damaged checkpoint was loaded.
    for name, tensor in weights_2.items():
        assert torch.equal(run.accelerator.unwrap_model(run.model).state_dict()[name], tensor)
    assert [r[0] for r in records(out) if r[1] is None] == [1, 2]  # the log is cut back too
    assert train(run)["steps"] == 6


def test_auto_resume_with_every_checkpoint_damaged_is_refused(
    two_checkpoints: tuple[Any, Path],
) -> None:
    cfg, out = two_checkpoints
    (step_dir(out, 4) / "optimizer.bin").unlink()
    _truncate(step_dir(out, 2) / "model.safetensors", 0)
    before = snapshot(out)
    line = one_line_error(
        ["train", out.parent / "cfg.yaml", f"output_dir={out}", *_steps(cfg)],
        r"train\.resume auto: no whole checkpoint in .*checkpoints "
        r"\(step-00000004: optimizer\.bin is missing; step-00000002: model\.safetensors is "
        r"empty \(0 bytes\)\); .*--overwrite",
    )
    assert "Traceback" not in line
    assert snapshot(out) == before  # not even the lock or config.yaml


def test_explicit_damaged_checkpoint_is_an_error(two_checkpoints: tuple[Any, Path]) -> None:
    cfg, out = two_checkpoints
    _truncate(step_dir(out, 4) / "model.safetensors", 100)
    before = snapshot(out)
    one_line_error(
        [
            "train",
            out.parent / "cfg.yaml",
            f"output_dir={out}",
            f"train.resume={step_dir(out, 4)}",
            *_steps(cfg),
        ],
        rf"train\.resume: checkpoint '{re.escape(str(step_dir(out, 4)))}' is damaged: "
        r"model\.safetensors is truncated \(100 bytes",
    )
    assert snapshot(out) == before


def test_load_checkpoint_refuses_a_damaged_one_before_loading(
    two_checkpoints: tuple[Any, Path],
) -> None:
    """load_checkpoint (also used for the best checkpoint at the end) checks first."""
    cfg, out = two_checkpoints
    run = setup(cfg, quiet())
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    weights = load_file(step_dir(out, 2) / "model.safetensors")
    save_file({k: v + 1 for k, v in weights.items()}, step_dir(out, 2) / "model.safetensors")
    _truncate(step_dir(out, 2) / "optimizer.bin", 10)
    with pytest.raises(errors.BigftError, match=r"step-00000002 is damaged: optimizer\.bin"):
        ckpt_resume.load_checkpoint(run.accelerator, step_dir(out, 2))
    after = run.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half-loaded
    run.accelerator.end_training()


def _steps(cfg: Any) -> list[str]:
    return [
        f"train.steps={cfg.train.steps}",
        f"checkpoint.every_steps={cfg.checkpoint.every_steps}",
    ]


# ---------------------------------------------------------------------------------------
# Strict JSON: a NaN metric is null in metrics.jsonl, summary.json and trainer_state.json.


def _strict(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_nan_metrics_are_written_as_strict_json(
    tiny_base: Path, data_file: Path, tmp_path: Path
) -> None:
    """A base whose head holds a NaN: every loss is NaN (each update is skipped), and so
    is every evaluation."""
    base = tmp_path / "nan-base"
    base.mkdir()
    for file in tiny_base.iterdir():
        (base / file.name).write_bytes(file.read_bytes())
    weights = load_file(base / "model.safetensors")
    weights["lm_head.weight"][0, 0] = float("nan")
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})

    cfg = config(
        tmp_path,
        tiny_base,
        data_file,
        f"model.name_or_path={base}",
        "train.steps=3",
        "checkpoint.every_steps=3",
        "eval.every_steps=3",
    )
    summary = train(setup(cfg, quiet()))
    out = Path(cfg.output_dir)
    assert summary["skipped_steps"] == 3

    lines = (out / "metrics.jsonl").read_text().splitlines()
    parsed = [_strict(line) for line in lines]
    assert [r["loss"] for r in parsed if "split" not in r] == [None, None, None]
    assert [r["eval_loss"] for r in parsed if r.get("split") == "validation"] == [None]
    assert _strict((out / "summary.json").read_text())["validation"]["eval_loss"] is None
    state = _strict((step_dir(out, 3) / ckpt.STATE_FILE).read_text())
    assert state["last_eval"]["eval_loss"] is None


# ---------------------------------------------------------------------------------------
# output_dir that cannot be written; user errors found late in setup write nothing.


@pytest.fixture
def unwritable(tmp_path: Path) -> Path:
    """A directory this process cannot create files in."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    # root ignores permission bits; sysfs refuses new files even to root
    if not Path("/sys").is_dir():
        pytest.skip("no directory that root cannot write")
    return Path("/sys")


def test_unwritable_output_dir_is_named_not_reported_as_full(
    unwritable: Path, tiny_base: Path, data_file: Path, tmp_path: Path
) -> None:
    path = cfg_file(tmp_path, tiny_base, data_file)
    out = unwritable / "bigft-run"
    line = one_line_error(
        ["train", path, f"output_dir={out}"],
        rf"output_dir '{re.escape(str(out))}' is not writable \(it would be created in "
        rf"'{re.escape(str(unwritable))}': .+\); choose another output_dir",
    )
    assert "free" not in line
    assert not out.exists()


@pytest.mark.parametrize("builder", ["build_scheduler", "build_optimizer"])
def test_optimizer_and_schedule_errors_come_before_any_write(
    builder: str,
    tiny_base: Path,
    data_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The builders raise ConfigError for settings that do not fit the run (warmup longer
    than the run): output_dir must not exist yet when they do."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ConfigError("schedule.warmup_steps: 100 is more than the run's 2 steps")

    monkeypatch.setattr(loop_setup, builder, refuse)
    path = cfg_file(tmp_path, tiny_base, data_file)
    one_line_error(["train", path, "train.steps=2"], r"schedule\.warmup_steps: 100")
    assert not (tmp_path / "out").exists()


def test_checkpoint_that_does_not_fit_is_refused_before_any_write(
    two_checkpoints: tuple[Any, Path],
) -> None:
    """A tensor missing from a full fine-tuning checkpoint: refused by name from the
    safetensors header, before the lock or config.yaml is written."""
    cfg, out = two_checkpoints
    weights = load_file(step_dir(out, 4) / "model.safetensors")
    dropped = sorted(weights)[0]
    del weights[dropped]
    save_file(weights, step_dir(out, 4) / "model.safetensors", metadata={"format": "pt"})
    before = snapshot(out)
    one_line_error(
        ["train", out.parent / "cfg.yaml", f"output_dir={out}", *_steps(cfg)],
        rf"checkpoint {re.escape(str(step_dir(out, 4)))} does not fit this model \(it lacks "
        rf"1 trained tensor\(s\): {re.escape(dropped)}\)",
    )
    assert snapshot(out) == before


def test_failure_after_the_directory_is_claimed_releases_the_lock(
    tiny_base: Path, data_file: Path, tmp_path: Path
) -> None:
    """Adapters resumed onto another base are refused while loading, after output_dir is
    claimed: the lock is not left behind."""
    pytest.importorskip("peft")
    lora = ("method.name=lora", "method.lora.r=4", "train.steps=4", "checkpoint.every_steps=2")
    cfg = config(tmp_path, tiny_base, data_file, *lora)
    train(setup(cfg, quiet()), stop_after=2)
    other = tmp_path / "other-base"
    other.mkdir()
    for file in tiny_base.iterdir():
        (other / file.name).write_bytes(file.read_bytes())
    moved = config(tmp_path, tiny_base, data_file, *lora, f"model.name_or_path={other}")
    with pytest.raises(errors.BigftError, match="was trained on the base"):
        setup(moved, quiet())
    assert not (Path(cfg.output_dir) / ".bigft.lock").exists()
