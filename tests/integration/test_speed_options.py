"""train.compile, train.tf32 and the fused AdamW choice: what each turns on, and that a
compiled run trains the same model as an eager one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bigft.config_io import load_config
from bigft.engine.settings import apply_tf32
from bigft.loop.setup import setup
from bigft.loop.train import train
from bigft.model.compiled import is_compiled
from bigft.optim import fused_adamw
from bigft.tracking import read_metrics
from tests.helpers import alpaca_rows, write_config, write_jsonl


def _run(tmp_path: Path, tiny_base: Path, name: str, *overrides: str) -> tuple[dict, list]:
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(32))
    cfg = load_config(
        write_config(tmp_path / f"{name}.yaml", tiny_base, data),
        ["train.steps=3", "data.packing=false", f"output_dir={tmp_path / name}", *overrides],
    )
    run = setup(cfg)
    layers = list(run.accelerator.unwrap_model(run.model).model.layers)
    summary = train(run)
    summary["compiled_layers"] = sum(is_compiled(layer) for layer in layers)
    losses = [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r]
    return summary, losses


@pytest.mark.slow
def test_a_compiled_run_trains_like_the_eager_one(tiny_base: Path, tmp_path: Path) -> None:
    eager, eager_losses = _run(tmp_path, tiny_base, "eager")
    compiled, compiled_losses = _run(tmp_path, tiny_base, "compiled", "train.compile=true")
    assert eager["compiled_layers"] == 0 and "compiled_modules" not in eager["engine"]
    layers = compiled["compiled_layers"]
    assert layers >= 2 and compiled["engine"]["compiled_modules"] == layers
    # Inductor fuses and reorders fp32 arithmetic: equal to ~1e-6, not bitwise.
    assert len(compiled_losses) == len(eager_losses) == 3
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert compiled_losses[-1] < compiled_losses[0]


def test_tf32_only_on_ampere_or_newer_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_float32_matmul_precision()
    try:
        assert apply_tf32(True) is torch.cuda.is_available() and (
            not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] >= 8
        )
        if not torch.cuda.is_available():
            assert torch.get_float32_matmul_precision() == before == "highest"
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
        assert apply_tf32(True) is False  # Turing: no TF32
        assert torch.get_float32_matmul_precision() == before
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
        assert apply_tf32(False) is False and torch.get_float32_matmul_precision() == before
        assert apply_tf32(True) is True
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)


def test_adamw_is_fused_exactly_when_cuda_is_there() -> None:
    from bigft.config import OptimConfig
    from bigft.optim import build_optimizer

    assert fused_adamw() is torch.cuda.is_available()
    model = torch.nn.Linear(4, 4)
    optimizer = build_optimizer(model, OptimConfig(name="adamw"))
    assert bool(optimizer.defaults.get("fused")) is torch.cuda.is_available()
