"""Every fine-tuning method trains the tiny model on CPU; adapters export and merge exactly.

The tiny base is random, so adapters (a rank-16 change to a random network) lower the
held-out loss less than training every weight: the margins below say by how much.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from bigft.config import load_config
from bigft.model import count_parameters
from bigft.train import setup, train
from tests.helpers import alpaca_rows, write_config, write_jsonl

pytest.importorskip("peft")

IDS = torch.tensor([[1, 40, 41, 42, 43, 10, 50, 51, 52, 10]])

# Held-out loss must fall by at least this many nats (start ~4.62 = ln(101)).
MARGIN = {"full": 1.5, "freeze": 1.5, "lora": 0.25, "dora": 0.25, "qlora": 0.25}

METHODS = {
    "full": [
        "optim.layer_decay=0.8",
        "method.gradient_checkpointing=every_k",
        "method.checkpoint_every_k=2",
    ],
    "freeze": [
        "method.name=freeze",
        "method.freeze_embeddings=true",
        "method.freeze_first_layers=1",
    ],
    "lora": ["method.name=lora", "optim.lr=1e-2", "train.steps=60"],
    "dora": ["method.name=dora", "optim.lr=1e-2", "train.steps=60"],
    "qlora": [
        "method.name=qlora",
        "optim.lr=1e-2",
        "train.steps=60",
        "method.quant.compute_dtype=float32",
        "method.gradient_checkpointing=full",
    ],
}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", alpaca_rows(96))


def _shape(tiny_base: Path) -> dict[str, int]:
    c = json.loads((tiny_base / "config.json").read_text())
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    return {
        "V": c["vocab_size"],
        "H": c["hidden_size"],
        "I": c["intermediate_size"],
        "L": c["num_hidden_layers"],
        "KV": c["num_key_value_heads"] * head_dim,
    }


def expected_trainable(method: str, tiny_base: Path, r: int = 16) -> int:
    """Trainable parameters from the architecture alone (not from the model)."""
    s = _shape(tiny_base)
    h, i, kv = s["H"], s["I"], s["KV"]
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (in, out)
    layer = sum(a * b for a, b in linears) + 2 * h  # + two RMSNorm weights
    if method == "full":
        return s["L"] * layer + 2 * s["V"] * h + h
    if method == "freeze":  # embeddings and layer 0 frozen
        return (s["L"] - 1) * layer + h + s["V"] * h
    lora = s["L"] * sum(r * (a + b) for a, b in linears)
    if method == "dora":  # + one magnitude per output feature
        return lora + s["L"] * sum(b for _, b in linears)
    return lora


def _cfg(tiny_base: Path, data_file: Path, tmp_path: Path, overrides: list[str]) -> Any:
    path = write_config(tmp_path / "cfg.yaml", tiny_base, data_file)
    return load_config(path, ["train.steps=30", "eval.at_start=true", *overrides])


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_and_counts_are_exact(method, tiny_base, data_file, tmp_path) -> None:
    cfg = _cfg(tiny_base, data_file, tmp_path, [*METHODS[method], "checkpoint.export=false"])
    run = setup(cfg)
    trainable, _ = count_parameters(run.model)
    assert trainable == expected_trainable(method, tiny_base)
    summary = train(run)
    first = json.loads((Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()[0])
    start, end = first["eval_loss"], summary["validation"]["eval_loss"]
    assert end < start - MARGIN[method], (method, start, end)


def test_qlora_layers_are_4bit_and_footprint_shrinks(tiny_base) -> None:
    from bitsandbytes.nn import Linear4bit

    from bigft.config import ModelConfig, QuantConfig
    from bigft.model import load_model

    full = load_model(ModelConfig(name_or_path=str(tiny_base)))
    quant = load_model(
        ModelConfig(name_or_path=str(tiny_base)), quant=QuantConfig(compute_dtype="float32")
    )
    linear_names = {n for n, m in full.named_modules() if isinstance(m, torch.nn.Linear)}
    four_bit = {n for n, m in quant.named_modules() if isinstance(m, Linear4bit)}
    assert four_bit == linear_names - {"lm_head"}  # the head stays in full precision
    linear_numel = 0
    for name in four_bit:
        weight = quant.get_submodule(name).weight
        assert weight.dtype == torch.uint8
        numel = full.get_submodule(name).weight.numel()
        assert weight.numel() == numel // 2  # two 4-bit values per byte
        linear_numel += numel
    saved = full.get_memory_footprint() - quant.get_memory_footprint()
    # fp32 (4 bytes) -> 0.5 byte per weight, less the blockwise constants (< 0.1 byte)
    assert 3.4 * linear_numel < saved <= 3.5 * linear_numel


def _logits(model: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_export_adapter_and_exact_merge(method, tiny_base, data_file, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bigft.config import ModelConfig, QuantConfig
    from bigft.export import export_run
    from bigft.model import load_model

    cfg = _cfg(tiny_base, data_file, tmp_path, [*METHODS[method], "train.steps=6"])
    run = setup(cfg)
    train(run)
    trained = _logits(run.accelerator.unwrap_model(run.model))
    final = Path(cfg.output_dir) / "final"
    assert (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()
    assert (final / "tokenizer.json").is_file()

    # Adapter: the ecosystem's loader on the same base gives the trained model's logits.
    quant = QuantConfig(compute_dtype="float32") if method == "qlora" else None
    base = load_model(ModelConfig(name_or_path=str(tiny_base)), quant=quant)
    adapter = _logits(PeftModel.from_pretrained(base, str(final)))
    torch.testing.assert_close(adapter, trained, rtol=0, atol=1e-5)

    # Merged: a plain transformers model, same logits to fp32 tolerance.
    merged_dir = export_run(cfg.output_dir, tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    torch.testing.assert_close(_logits(merged), trained, rtol=0, atol=1e-4)
    assert (merged_dir / "tokenizer.json").is_file()
    assert (merged_dir / "generation_config.json").is_file()


def test_cli_export_copies_adapter(tiny_base, data_file, tmp_path) -> None:
    from peft import PeftConfig
    from typer.testing import CliRunner

    from bigft.cli import app

    cfg = _cfg(tiny_base, data_file, tmp_path, [*METHODS["lora"], "train.steps=2"])
    train(setup(cfg))
    out = tmp_path / "adapter"
    result = CliRunner().invoke(app, ["export", cfg.output_dir, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert PeftConfig.from_pretrained(str(out)).r == 16
    missing = CliRunner().invoke(app, ["export", str(tmp_path / "nope"), "--out", str(out)])
    assert missing.exit_code == 2


def test_qlora_resume_reproduces_uninterrupted_run(tiny_base, data_file, tmp_path) -> None:
    from safetensors.torch import load_file

    def adapter_weights(out: Path, interrupt: bool) -> dict[str, torch.Tensor]:
        cfg = _cfg(
            tiny_base,
            data_file,
            tmp_path,
            [
                *METHODS["qlora"],
                "train.steps=6",
                "eval.at_start=false",
                f"output_dir={out}",
                "checkpoint.every_steps=100",
            ],
        )
        if interrupt:
            assert train(setup(cfg), stop_after=3)["stopped"]
        run = setup(cfg)
        assert run.step == (3 if interrupt else 0)
        train(run)
        return load_file(out / "final" / "adapter_model.safetensors")

    straight = adapter_weights(tmp_path / "a", interrupt=False)
    resumed = adapter_weights(tmp_path / "b", interrupt=True)
    assert straight.keys() == resumed.keys() and straight
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
