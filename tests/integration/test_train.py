"""The loop end to end on a tiny model: learning, export, resume, accumulation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigft.config_io import load_config
from bigft.loop.setup import setup
from bigft.loop.step import train_step
from bigft.loop.train import train
from bigft.tracking import read_metrics
from tests.helpers import alpaca_rows, write_config, write_jsonl


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", alpaca_rows(96))


def test_train_learns_and_export_reloads_with_same_logits(tiny_base, data_file, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = load_config(
        write_config(tmp_path / "cfg.yaml", tiny_base, data_file),
        ["train.steps=40", "eval.every_steps=20", "checkpoint.every_steps=20"],
    )
    run = setup(cfg)
    summary = train(run)
    out = Path(cfg.output_dir)

    records = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 41))
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    evals = [r for r in read_metrics(out) if r.get("split") == "validation"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]

    exported = AutoModelForCausalLM.from_pretrained(out / "final")
    ids = torch.tensor([[1, 40, 41, 42, 43, 10, 50, 51]])
    with torch.no_grad():
        expected = run.model(input_ids=ids).logits
        got = exported(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "final" / "tokenizer.json").is_file()
    assert summary["final_model"] == str(out / "final")
    # resolved config written beside the run; checkpoint pruned to keep_last
    assert load_config(out / "config.yaml").train.steps == 40
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-00000020", "step-00000040"]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reproduces_uninterrupted_run(tiny_base, data_file, tmp_path, workers) -> None:
    """With loader workers reading ahead (prefetch), the interrupted run still resumes at
    the first batch it had not trained on: its weights equal a run without workers."""

    def final_weights(out: str, interrupt: bool) -> dict[str, torch.Tensor]:
        cfg = load_config(
            write_config(tmp_path / "cfg.yaml", tiny_base, data_file),
            [
                "train.steps=8",
                f"output_dir={out}",
                "checkpoint.every_steps=100",
                f"data.loader_workers={workers if interrupt else 0}",
            ],
        )
        if interrupt:
            stopped = train(setup(cfg), stop_after=3)
            assert stopped["stopped"] and stopped["steps"] == 3
        run = setup(cfg)  # resume: auto
        assert run.state.step == (3 if interrupt else 0)
        train(run)
        return load_file(Path(out) / "final" / "model.safetensors")

    straight = final_weights(str(tmp_path / "a"), interrupt=False)
    resumed = final_weights(str(tmp_path / "b"), interrupt=True)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    # the resumed run's metrics continue where the first part stopped
    steps = [r["step"] for r in read_metrics(tmp_path / "b") if "loss" in r]
    assert steps == list(range(1, 9))


def _one_step(tiny_base: Path, data_file: Path, tmp_path: Path, micro: int, accum: int):
    cfg = load_config(
        write_config(tmp_path / f"cfg{micro}.yaml", tiny_base, data_file),
        [
            f"train.micro_batch_size={micro}",
            f"train.grad_accum={accum}",
            "train.max_grad_norm=1.0e9",  # report the norm, never clip
            "data.packing=false",
            "train.steps=1",
            f"output_dir={tmp_path / f'out{micro}'}",
        ],
    )
    run = setup(cfg)
    loader = iter(run.loader)
    batches = [next(loader) for _ in range(accum)]
    lengths = {int(m) for b in batches for m in b["attention_mask"].sum(1)}
    stats = train_step(run, batches)
    weights = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    return stats, weights, lengths


def test_accumulation_equals_one_big_batch(tiny_base, data_file, tmp_path) -> None:
    big, w_big, lengths = _one_step(tiny_base, data_file, tmp_path, micro=4, accum=1)
    small, w_small, _ = _one_step(tiny_base, data_file, tmp_path, micro=1, accum=4)
    assert len(lengths) > 1, "the test needs sequences of different lengths"
    assert small["targets"] == big["targets"]
    assert small["loss"] == pytest.approx(big["loss"], rel=1e-6)
    assert small["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-5)
    # One Adam step moves each weight by about lr x g / (|g| + eps): for the rare element
    # whose gradient is near eps, summation-order noise in g shows at ~1e-6; a real
    # accumulation error would move weights by up to 2 x lr (6e-3).
    for name in w_big:
        torch.testing.assert_close(w_small[name], w_big[name], rtol=1e-5, atol=1e-5)


def test_cli_train_subprocess(tiny_base, data_file, tmp_path) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", tiny_base, data_file)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bigft", "train", str(cfg), "train.steps=3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert "Traceback" not in proc.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert (out / "final" / "model.safetensors").is_file()


def test_auto_micro_batch_uses_the_planner(tiny_base, data_file, tmp_path, monkeypatch) -> None:
    from rich.console import Console

    from bigft.loop.setup import _auto_micro_batch

    cfg = load_config(
        write_config(tmp_path / "cfg.yaml", tiny_base, data_file), ["train.micro_batch_size=auto"]
    )
    monkeypatch.delenv("BIGFT_PLAN_GPU_MEM_GIB", raising=False)
    assert _auto_micro_batch(cfg, Console()) == 1  # no GPU to plan for
    monkeypatch.setenv("BIGFT_PLAN_GPU_MEM_GIB", "1")
    small = _auto_micro_batch(cfg, Console())
    monkeypatch.setenv("BIGFT_PLAN_GPU_MEM_GIB", "2")
    large = _auto_micro_batch(cfg, Console())
    assert small is not None and large is not None and 1 <= small < large


@pytest.mark.parametrize(("clip", "votes"), [("1.0", 0), ("null", 6)])
def test_the_loss_is_reduced_only_when_logged_or_voted_on(
    tiny_base, data_file, tmp_path, monkeypatch, clip: str, votes: int
) -> None:
    """With clipping the global gradient norm decides finiteness, and a step reduces its
    loss only when it is logged (steps 3 and 6 of 6, log_every 3), besides every step's
    token counts; without clipping the loss (with each process's gradient check) is every
    step's finiteness vote."""
    import bigft.loop.train as loop_train

    cfg = load_config(
        write_config(tmp_path / "cfg.yaml", tiny_base, data_file),
        ["train.steps=6", "train.log_every=3", f"train.max_grad_norm={clip}"],
    )
    run = setup(cfg)
    calls: list[tuple[int, ...]] = []
    real_reduce, real_step = run.accelerator.reduce, loop_train.train_step
    inside = []

    def counting_reduce(tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        if inside:
            calls.append(tuple(tensor.shape))
        return real_reduce(tensor, *args, **kwargs)

    def step(*args, **kwargs):  # type: ignore[no-untyped-def]
        inside.append(True)
        try:
            return real_step(*args, **kwargs)
        finally:
            inside.pop()

    run.accelerator.reduce = counting_reduce  # type: ignore[method-assign]
    monkeypatch.setattr(loop_train, "train_step", step)
    train(run)
    assert calls.count((3,)) == 6  # token counts and stop requests, every step
    assert calls.count(()) == (2 if votes == 0 else 0)  # the logged steps' loss
    assert calls.count((2,)) == votes  # loss + gradient check, voted every step
    assert len(calls) == 6 + (2 if votes == 0 else votes)
    records = [r for r in read_metrics(Path(cfg.output_dir)) if "loss" in r]
    assert [r["step"] for r in records] == [3, 6]
    assert all(r["loss"] is not None and r["loss"] > 0 for r in records)
