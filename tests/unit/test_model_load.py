"""Loading: the attention implementation each architecture really supports, and the dtype
`model.dtype: auto` loads weights in (tiny models saved and loaded back the real way)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from bigft.config import ModelConfig
from bigft.errors import ModelError
from bigft.model.attention import (
    attention_implementation,
    attention_summary,
    choose_attn_implementation,
)
from bigft.model.load import load_dtype, load_model

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "vocab_size": 128}


def _save(model: Any, path: Path) -> Path:
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real architecture whose transformers class refuses sdpa (Gemma-2's soft-capping)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        **TINY, num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0
    )
    return _save(Gemma2ForCausalLM(config), tmp_path_factory.mktemp("gemma2"))


@pytest.fixture(scope="module")
def remote_no_sdpa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint shipping its own modelling code (auto_map) whose class supports
    neither sdpa nor flash attention: loaded through the normal trust_remote_code path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = _save(
        LlamaForCausalLM(LlamaConfig(**TINY, num_attention_heads=2)),
        tmp_path_factory.mktemp("remote"),
    )
    (path / "eageronly.py").write_text(
        "from transformers import LlamaForCausalLM\n\n\n"
        "class EagerOnly(LlamaForCausalLM):\n"
        "    _supports_sdpa = False\n"
        "    _supports_flash_attn = False\n"
        "    _supports_flex_attn = False\n"
    )
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "eageronly.EagerOnly"}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(**TINY, num_attention_heads=2)
    return _save(BertModel(config), tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def deberta_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An encoder whose transformers class has no sdpa path (DeBERTa-v2)."""
    from transformers import DebertaV2Config, DebertaV2Model

    torch.manual_seed(0)
    config = DebertaV2Config(**TINY, num_attention_heads=2)
    return _save(DebertaV2Model(config), tmp_path_factory.mktemp("deberta"))


def _load(path: Path, **model: Any) -> Any:
    return load_model(ModelConfig(name_or_path=str(path), **model))


def test_auto_falls_back_to_eager_for_gemma2_and_says_so(gemma2_dir, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="bigft.model"):
        model = _load(gemma2_dir)
    assert attention_implementation(model) == "eager"
    lines = [r.getMessage() for r in caplog.records if "attention" in r.getMessage()]
    assert len(lines) == 1 and "Gemma2ForCausalLM" in lines[0] and "eager" in lines[0]
    assert "sdpa" in lines[0]  # and why: the architecture does not support it
    summary = attention_summary(model)
    assert summary.startswith("eager") and "Gemma2ForCausalLM" in summary
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_explicit_sdpa_on_gemma2_is_a_model_error(gemma2_dir) -> None:
    with pytest.raises(ModelError, match=r"model\.attn_implementation: sdpa .*Gemma2ForCausalLM"):
        _load(gemma2_dir, attn_implementation="sdpa")
    assert attention_implementation(_load(gemma2_dir, attn_implementation="eager")) == "eager"


def test_remote_code_class_without_sdpa_runs_eager(remote_no_sdpa_dir) -> None:
    model = _load(remote_no_sdpa_dir, trust_remote_code=True)
    assert type(model).__name__ == "EagerOnly"
    assert attention_implementation(model) == "eager"
    assert "EagerOnly" in attention_summary(model)
    with pytest.raises(ModelError, match=r"model\.attn_implementation: flash_attention_2"):
        _load(remote_no_sdpa_dir, trust_remote_code=True, attn_implementation="flash_attention_2")


def test_llama_keeps_sdpa(tiny_base) -> None:
    model = _load(tiny_base)
    assert attention_implementation(model) == "sdpa"
    assert attention_summary(model).startswith("sdpa")


@pytest.mark.parametrize(("fixture", "expected"), [("bert_dir", "sdpa"), ("deberta_dir", "eager")])
def test_encoders_for_classification(fixture: str, expected: str, request) -> None:
    path = request.getfixturevalue(fixture)
    model = load_model(
        ModelConfig(name_or_path=str(path)), task="classification", label_names=["a", "b"]
    )
    assert attention_implementation(model) == expected
    assert type(model).__name__.endswith("ForSequenceClassification")


def test_choice_table_per_architecture() -> None:
    from transformers import Gemma2ForCausalLM, GPTNeoForCausalLM, LlamaForCausalLM

    # auto on a GPU with flash-attn installed: flash where the class has it, else sdpa,
    # else eager; never flex (it crashes on CPU and compiles on first use).
    assert choose_attn_implementation("auto", LlamaForCausalLM, flash=True) == "flash_attention_2"
    assert choose_attn_implementation("auto", Gemma2ForCausalLM, flash=True) == "flash_attention_2"
    assert choose_attn_implementation("auto", Gemma2ForCausalLM, flash=False) == "eager"
    assert choose_attn_implementation("auto", GPTNeoForCausalLM, flash=False) == "eager"
    assert choose_attn_implementation("auto", LlamaForCausalLM, flash=False) == "sdpa"
    assert choose_attn_implementation("eager", LlamaForCausalLM, flash=False) == "eager"
    with pytest.raises(ModelError, match="supports: eager, flash_attention_2"):
        choose_attn_implementation("sdpa", Gemma2ForCausalLM, flash=False)
    # Unknown class (not resolvable before loading): transformers decides (None).
    assert choose_attn_implementation("auto", None, flash=False) is None


def test_auto_dtype_per_method_and_precision() -> None:
    from bigft.config import QuantConfig

    bf16, fp32 = torch.bfloat16, torch.float32
    # Frozen bases load in the compute dtype; full fine-tuning keeps fp32 master weights.
    for method in ("lora", "dora", "freeze"):
        assert load_dtype("auto", "bf16", method) == bf16
        assert load_dtype("auto", "fp16", method) == torch.float16
        assert load_dtype("auto", "fp32", method) == fp32
    assert load_dtype("auto", "bf16", "full") == fp32
    assert load_dtype("auto", "fp32", "qlora", QuantConfig()) == bf16  # compute dtype
    assert load_dtype("float32", "bf16", "lora") == fp32  # explicit override
    assert load_dtype("bfloat16", "fp32", "full") == bf16


def test_lora_base_loads_in_bf16_without_an_fp32_copy(tiny_base) -> None:
    model = load_model(ModelConfig(name_or_path=str(tiny_base)), "bf16", method="lora")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    full = load_model(ModelConfig(name_or_path=str(tiny_base)), "bf16", method="full")
    assert {p.dtype for p in full.parameters()} == {torch.float32}
