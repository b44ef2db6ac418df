"""Tiny base models and tokenizers made in code, for the demo and the tests.

They are saved with `save_pretrained` and loaded back through the same path a real
checkpoint takes, so nothing downstream knows they are tiny.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def build_char_tokenizer() -> Any:
    """A character-level fast tokenizer over printable ASCII and newline (100 tokens).

    Has pad/bos/eos/unk and no chat template, like many base-model tokenizers.
    """
    from tokenizers import Tokenizer, decoders, models

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return wrap_tokenizer(backend, add_bos_token=False)


def wrap_tokenizer(backend: Any, **extra: Any) -> Any:
    """A transformers fast tokenizer around a `tokenizers` backend whose vocabulary starts
    with SPECIAL_TOKENS (pad, bos, eos, unk)."""
    from transformers import PreTrainedTokenizerFast

    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        **extra,
    )
    tokenizer.model_max_length = 4096
    return tokenizer


def build_tiny_llama(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_positions: int = 1024,
    seed: int = 0,
) -> Any:
    """A randomly initialized Llama-architecture causal LM (fixed seed)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def save_tiny_base(out_dir: str | Path, **model_kwargs: Any) -> Path:
    """Write a tiny base model + tokenizer directory loadable with `from_pretrained`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(vocab_size=len(tokenizer), **model_kwargs)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
