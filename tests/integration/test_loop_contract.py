"""What the loop promises about each step: the lr it logs is the lr it used, warmup never
wastes a step on lr 0, the last checkpoint is written once, and test instrumentation
(full-weight digests, per-rank RSS) stays off the production path."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bigft.config_io import load_config
from bigft.engine import checkpoint as ckpt
from bigft.engine import facts
from bigft.engine.settings import batch_layout
from bigft.errors import ConfigError
from bigft.loop.setup import setup
from bigft.loop.train import train
from bigft.optim import schedule_factor
from bigft.tracking import read_metrics
from tests.helpers import alpaca_rows, write_config, write_jsonl

LR = 3e-3


@pytest.fixture
def config_file(tiny_base: Path, tmp_path: Path) -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(96))
    return write_config(tmp_path / "cfg.yaml", tiny_base, data)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_logged_lr_is_the_lr_each_update_used(config_file: Path, schedule: str) -> None:
    cfg = load_config(
        config_file,
        [
            "train.steps=8",
            "train.log_every=1",
            f"schedule.name={schedule}",
            "schedule.warmup_steps=3",
            "schedule.min_lr_ratio=0.1",
            f"optim.lr={LR}",
        ],
    )
    run = setup(cfg)
    used: list[float] = []
    inner = run.optimizer.optimizer  # accelerate wraps the torch optimizer
    inner.register_step_pre_hook(lambda opt, *_: used.append(opt.param_groups[0]["lr"]))
    run_one = train(run)
    assert run_one["steps"] == 8

    logged = [r["lr"] for r in read_metrics(cfg.output_dir) if "loss" in r]
    assert len(logged) == len(used) == 8
    assert logged == pytest.approx(used, rel=1e-12)
    # Warmup ramps from a non-zero first update to the full lr right after warmup.
    assert logged[:4] == pytest.approx([LR / 4, LR / 2, 3 * LR / 4, LR], rel=1e-12)
    expected_last = {
        "linear": LR * (1 - 4 / 5),
        "cosine": LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 5))),
    }
    assert logged[-1] == pytest.approx(expected_last[schedule], rel=1e-12)


def test_first_warmup_update_is_not_zero() -> None:
    for name in ("linear", "cosine", "constant"):
        assert schedule_factor(0, name, warmup=10, total=100, min_ratio=0.0) > 0
        assert schedule_factor(10, name, warmup=10, total=100, min_ratio=0.0) == 1.0


def test_grad_accum_contradicting_global_batch_is_an_error(config_file: Path) -> None:
    cfg = load_config(
        config_file,
        ["train.micro_batch_size=2", "train.grad_accum=2", "train.global_batch_size=8"],
    )
    assert batch_layout(cfg.train, world_size=2).grad_accum == 2  # 2 x 2 x 2 = 8: agrees
    with pytest.raises(ConfigError) as err:
        batch_layout(cfg.train, world_size=1)  # 8 / (2 x 1) = 4 micro-batches, not 2
    text = str(err.value)
    assert "train.grad_accum" in text and "train.global_batch_size" in text
    assert "\n" not in text


def test_last_checkpoint_written_once(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps: list[int] = []
    real = ckpt.save_checkpoint

    def counting(acc: Any, out: Any, step: int, *args: Any, **kwargs: Any) -> Path:
        steps.append(step)
        return real(acc, out, step, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", counting)
    cfg = load_config(config_file, ["train.steps=6", "checkpoint.every_steps=3"])
    train(setup(cfg))
    assert steps == [3, 6]

    steps.clear()  # a run that ends between periodic checkpoints still saves its end
    cfg = load_config(
        config_file,
        ["train.steps=7", "checkpoint.every_steps=3", f"output_dir={cfg.output_dir}-b"],
    )
    train(setup(cfg))
    assert steps == [3, 6, 7]


def test_no_full_weight_gather_on_the_production_path(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the test hook, the end of a run gathers no weights and no per-rank RSS."""

    def forbidden(*_: Any) -> Any:
        raise AssertionError("instrumentation ran on the production path")

    monkeypatch.delenv("BIGFT_TEST_WEIGHTS_DIGEST", raising=False)
    monkeypatch.setattr(facts, "full_weights_digest", forbidden)
    monkeypatch.setattr(facts, "peak_rss_mib_per_rank", forbidden)
    cfg = load_config(config_file, ["train.steps=2"])
    summary = train(setup(cfg))
    written = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    for key in ("weights_sha256_per_rank", "peak_rss_mib_per_rank"):
        assert key not in summary and key not in written

    # With the hook set, a test sees the digest of the weights it trained.
    monkeypatch.undo()
    monkeypatch.setenv("BIGFT_TEST_WEIGHTS_DIGEST", "1")
    cfg = load_config(config_file, ["train.steps=2", f"output_dir={cfg.output_dir}-hook"])
    run = setup(cfg)
    summary = train(run)
    assert len(summary["weights_sha256_per_rank"]) == 1
    assert summary["weights_sha256_per_rank"] == facts.full_weights_digest(
        run.accelerator, run.model
    )
