"""Load the tokenizer and the model to fine-tune, the way real checkpoints are loaded."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch

from bigft.config import ModelConfig
from bigft.errors import ModelError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


def _check_source(name: str, what: str) -> None:
    """A local path that does not exist is a typo, not a hub id: say so before transformers."""
    if _looks_local(name) and not Path(name).expanduser().exists():
        raise ModelError(f"{what} '{name}': directory not found")


def pick_attn_implementation(requested: str) -> str:
    """flash_attention_2 when flash-attn imports and CUDA is present; sdpa otherwise."""
    if requested != "auto":
        if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ModelError(
                "model.attn_implementation: flash_attention_2 needs flash-attn "
                "(pip install 'bigft[flash]'), or use sdpa"
            )
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(cfg: ModelConfig) -> Any:
    """Tokenizer from model.tokenizer (or the model's directory), with a pad token."""
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.name_or_path
    _check_source(name, "model.tokenizer" if cfg.tokenizer else "model.name_or_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load tokenizer '{name}': {_first_line(exc)}") from None
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of loss and attention, so reusing EOS is safe;
        # adding a new token would change the embedding size of a pretrained model.
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer '{name}' has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, precision: str = "fp32") -> Any:
    """AutoModelForCausalLM from a local directory or hub id, in the configured dtype."""
    from transformers import AutoModelForCausalLM

    _check_source(cfg.name_or_path, "model.name_or_path")
    dtype = _DTYPES.get(cfg.dtype, torch.float32)  # auto: fp32 master weights
    attn = pick_attn_implementation(cfg.attn_implementation)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path,
            revision=cfg.revision,
            dtype=dtype,
            attn_implementation=attn,
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model '{cfg.name_or_path}': {_first_line(exc)}") from None
    model.config.use_cache = False  # training; generation turns it back on explicitly
    log.info("loaded %s (%s, attention: %s)", cfg.name_or_path, dtype, attn)
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
