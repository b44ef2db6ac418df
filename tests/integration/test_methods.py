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

from bigft.config_io import load_config
from bigft.loop.setup import setup
from bigft.loop.train import train
from bigft.model.load import count_parameters
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
    from bigft.model.load import load_model

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
    from bigft.model.export import export_run
    from bigft.model.load import load_model

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

    from bigft.commands import app

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
        assert run.state.step == (3 if interrupt else 0)
        train(run)
        return load_file(out / "final" / "adapter_model.safetensors")

    straight = adapter_weights(tmp_path / "a", interrupt=False)
    resumed = adapter_weights(tmp_path / "b", interrupt=True)
    assert straight.keys() == resumed.keys() and straight
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def _dtypes(model: Any) -> dict[str, set[torch.dtype]]:
    """Parameter dtypes of a (peft-wrapped) model: trainable, frozen, and the frozen ones
    bitsandbytes stores packed (4-bit)."""
    out: dict[str, set[torch.dtype]] = {"trainable": set(), "frozen": set(), "4bit": set()}
    for p in model.parameters():
        kind = "trainable" if p.requires_grad else "frozen"
        out["4bit" if type(p).__name__ == "Params4bit" else kind].add(p.dtype)
    return out


BF16 = ["train.precision=bf16", "checkpoint.export=true"]


@pytest.fixture
def fresh_accelerator() -> Any:
    """Accelerate keeps one process-wide state, whose mixed precision cannot change: a bf16
    run among fp32 ones needs it reset before and after (as accelerate's own tests do)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("method", ["lora", "freeze"])
def test_bf16_run_keeps_frozen_weights_in_bf16_and_trainable_in_fp32(
    method, tiny_base, data_file, tmp_path, fresh_accelerator
) -> None:
    """model.dtype auto under mixed bf16: frozen weights in bf16 (half the memory),
    what trains in fp32 (LoRA adapters; freeze's layers as master weights)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tiny_base, data_file, tmp_path, [*METHODS[method], *BF16])
    assert cfg.model.dtype == "auto"
    run = setup(cfg)
    dtypes = _dtypes(run.accelerator.unwrap_model(run.model))
    assert dtypes["frozen"] == {torch.bfloat16} and dtypes["trainable"] == {torch.float32}
    summary = train(run)
    first = json.loads((Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()[0])
    assert summary["validation"]["eval_loss"] < first["eval_loss"] - MARGIN[method]
    final = Path(cfg.output_dir) / "final"
    if method == "lora":
        base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16)
        adapter = PeftModel.from_pretrained(base, str(final))
        assert torch.isfinite(_logits(adapter)).all()
    else:
        exported = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
        assert torch.isfinite(_logits(exported)).all()


def test_explicit_float32_dtype_overrides_auto(
    tiny_base, data_file, tmp_path, fresh_accelerator
) -> None:
    cfg = _cfg(tiny_base, data_file, tmp_path, [*METHODS["lora"], *BF16, "model.dtype=float32"])
    run = setup(cfg)
    dtypes = _dtypes(run.accelerator.unwrap_model(run.model))
    assert dtypes["frozen"] == {torch.float32} and dtypes["trainable"] == {torch.float32}


def test_qlora_keeps_embeddings_head_and_norms_in_compute_dtype(
    tiny_base, data_file, tmp_path, fresh_accelerator
) -> None:
    """Not peft's prepare_model_for_kbit_training upcast: weights that are not 4-bit stay in
    the bf16 compute dtype; the linears are 4-bit; only the fp32 adapters train."""
    from bitsandbytes.nn import Linear4bit

    overrides = [o for o in METHODS["qlora"] if "compute_dtype" not in o]
    cfg = _cfg(tiny_base, data_file, tmp_path, [*overrides, "train.precision=bf16"])
    assert cfg.method.quant.compute_dtype == "bfloat16"
    run = setup(cfg)
    model = run.accelerator.unwrap_model(run.model)
    base = model.get_base_model()
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16
    assert base.get_output_embeddings().weight.dtype == torch.bfloat16
    assert base.model.norm.weight.dtype == torch.bfloat16
    four_bit = [m for m in base.modules() if isinstance(m, Linear4bit)]
    assert len(four_bit) == 7 * base.config.num_hidden_layers
    assert all(m.weight.dtype == torch.uint8 and m.weight.numel() for m in four_bit)
    dtypes = _dtypes(model)
    assert dtypes["frozen"] == {torch.bfloat16} and dtypes["4bit"] == {torch.uint8}
    assert dtypes["trainable"] == {torch.float32}
    summary = train(run)
    first = json.loads((Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()[0])
    assert summary["validation"]["eval_loss"] < first["eval_loss"] - MARGIN["qlora"]
