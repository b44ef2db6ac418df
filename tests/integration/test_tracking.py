"""Trackers end to end: TensorBoard receives exactly what metrics.jsonl records, a
resumed run continues the same TensorBoard run, and no secret reaches a written file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bigft.config_io import load_config
from bigft.errors import BigftError
from bigft.loop.setup import setup
from bigft.loop.train import train
from bigft.tracking import read_metrics
from tests.helpers import alpaca_rows, write_config, write_jsonl

SECRETS = {"WANDB_API_KEY": "wandb-key-5f0c1e9a77d2", "HF_TOKEN": "hf_Zq8XkLmN3pRt6vWy"}
SLURM_SECRET = "slurm-env-token-40b1c2d3e4"


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_tensorboard_matches_metrics_across_resume_and_keeps_secrets_out(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(48))
    cfg_path = write_config(
        tmp_path / "cfg.yaml",
        tiny_base,
        data,
        logging={"progress_bar": False, "trackers": ["tensorboard"], "project": "tiny"},
        slurm={"env": {"EXTRA_API_TOKEN": SLURM_SECRET}},
    )
    cfg = load_config(cfg_path, ["train.steps=6", "eval.every_steps=3", "eval.at_start=false"])
    out = Path(cfg.output_dir)
    # Stopped at step 4 (a preemption), then resumed from that checkpoint to step 6.
    first = setup(cfg)
    assert train(first, stop_after=4)["stopped"] == "stop_after"
    first.accelerator.end_training()
    second = setup(cfg)
    assert second.state.step == 4
    train(second)
    second.accelerator.end_training()

    records = read_metrics(out)
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("split") == "validation"]
    assert [step for step, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in evals] == [3, 6]

    run_dirs = {p.parent for p in (out / "tensorboard").rglob("events.out.tfevents.*")}
    scalars = _scalars(out / "tensorboard" / "tiny")
    assert len(list((out / "tensorboard" / "tiny").glob("events.out.tfevents.*"))) == 2
    assert run_dirs - {out / "tensorboard" / "tiny"}, "the run's hyperparameters were logged"
    assert [s for s, _ in scalars["train/loss"]] == [s for s, _ in losses]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([v for _, v in losses], rel=1e-6)
    assert [s for s, _ in scalars["validation/eval_loss"]] == [3, 6]
    assert [v for _, v in scalars["validation/eval_loss"]] == pytest.approx(
        [v for _, v in evals], rel=1e-6
    )

    # Peak memory: this process's peak RSS on CPU (torch alone takes > 100 MiB), never
    # decreasing, and the same numbers in TensorBoard.
    mem = [r["mem_mib"] for r in records if "loss" in r]
    assert all(m > 100 for m in mem) and mem == sorted(mem)
    assert [v for _, v in scalars["train/mem_mib"]] == pytest.approx(mem, rel=1e-6)

    # The hyperparameters the trackers got, and the saved config, hold '***' instead.
    hparams = [p.read_text() for p in (out / "tensorboard").rglob("hparams.yml")]
    assert len(hparams) == 2  # one per start
    assert all("slurm.env" in text and "'***'" in text for text in hparams)
    assert "EXTRA_API_TOKEN: '***'" in (out / "config.yaml").read_text()
    captured = capfd.readouterr()
    for secret in [*SECRETS.values(), SLURM_SECRET]:
        assert secret not in captured.out + captured.err
        for path in out.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path


def test_missing_tracker_package_fails_before_anything_is_written(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(8))
    cfg = load_config(
        write_config(tmp_path / "cfg.yaml", tiny_base, data),
        ["logging.trackers=[tensorboard,wandb]"],
    )
    with pytest.raises(BigftError, match="pip install wandb"):
        setup(cfg)
    assert not Path(cfg.output_dir).exists()


def test_no_trackers_still_writes_metrics(tiny_base: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(16))
    cfg = load_config(
        write_config(tmp_path / "cfg.yaml", tiny_base, data),
        ["logging.trackers=[]", "train.steps=2", "checkpoint.export=false"],
    )
    run = setup(cfg)
    train(run)
    out = Path(cfg.output_dir)
    assert not (out / "tensorboard").exists() and not (out / "trackers.json").exists()
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
