"""The attention implementation: flash-attn when installed and supported by the model class,
sdpa otherwise; what was asked and what runs, said once.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch

from bigft.config import ModelConfig
from bigft.engine.settings import global_rank
from bigft.errors import ModelError

log = logging.getLogger(__name__)

# Attention implementations bigft selects, and the class flag that says a transformers
# model supports each (eager always works). flex_attention is never chosen: it crashed on
# CPU with a 4D mask and compiles on first use.
ATTENTION_FLAGS = {"flash_attention_2": "_supports_flash_attn", "sdpa": "_supports_sdpa"}


def _flash_usable() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def supported_attention(model_class: type) -> list[str]:
    """The implementations bigft can select that `model_class` supports, eager included."""
    found = ["eager"]
    for name, flag in ATTENTION_FLAGS.items():
        # `_supports_flash_attn_2`: the older spelling some remote-code models still use
        if getattr(model_class, flag, False) or (
            name == "flash_attention_2" and getattr(model_class, "_supports_flash_attn_2", False)
        ):
            found.append(name)
    return sorted(found)


def choose_attn_implementation(
    requested: str, model_class: type | None, flash: bool | None = None
) -> str | None:
    """The attention implementation to load `model_class` with.

    'auto': flash_attention_2 where the class supports it and flash-attn is usable (CUDA
    and the package; `flash` overrides that check), else sdpa where supported, else eager.
    transformers 5 refuses an explicit implementation its class does not support (Gemma-2
    has no sdpa path), so the choice is made per architecture. An explicit request the
    class does not support is a ModelError. With no class known before loading
    (`model_class` None), 'auto' returns None: transformers then picks sdpa or eager.
    """
    flash = _flash_usable() if flash is None else flash
    if model_class is None:
        if requested == "auto":
            return "flash_attention_2" if flash else None
    elif requested == "auto":
        supported = supported_attention(model_class)
        if flash and "flash_attention_2" in supported:
            return "flash_attention_2"
        return "sdpa" if "sdpa" in supported else "eager"
    elif requested not in (supported := supported_attention(model_class)):
        raise ModelError(
            f"model.attn_implementation: {requested} is not supported by "
            f"{model_class.__name__} (it supports: {', '.join(supported)}); choose one of "
            "those, or auto"
        )
    if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelError(
            "model.attn_implementation: flash_attention_2 needs flash-attn "
            "(pip install 'bigft[flash]'), or use sdpa"
        )
    return requested


def resolve_model_class(auto_class: Any, cfg: ModelConfig) -> type | None:
    """The class `auto_class.from_pretrained` will build, read from config.json alone
    (remote code through the same `auto_map` entry transformers follows). None when it
    cannot be told before loading; loading then reports the real problem."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError):
        return None
    auto_map = getattr(config, "auto_map", None) or {}
    if auto_class.__name__ in auto_map:
        if not cfg.trust_remote_code:
            return None
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(  # type: ignore[no-any-return]
            auto_map[auto_class.__name__], cfg.name_or_path, revision=cfg.revision
        )
    found = auto_class._model_mapping.get(type(config), None)
    return found[0] if isinstance(found, list | tuple) else found


def note_attention(model: Any, requested: str, model_class: type | None) -> None:
    """Record on the model which attention it runs and why, and say it once (rank 0):
    a warning when `auto` had to fall back to eager, info otherwise."""
    runs = attention_implementation(model) or "unknown"
    arch = type(model).__name__
    note = runs if requested != "auto" else f"{runs} (auto)"
    if not any(
        "attention" in type(m).__name__.lower() or "attn" in type(m).__name__.lower()
        for m in model.modules()
    ):
        note = "none (no attention layers)"  # a convolutional network: nothing to choose
    elif requested == "auto" and runs == "eager" and model_class is not None:
        note = f"eager ({arch} does not support sdpa"
        if "flash_attention_2" in supported_attention(model_class):
            note += "; its flash_attention_2 needs flash-attn and a GPU"
        note += ")"
    model.bigft_attention = note
    if global_rank() == 0:
        model_type = getattr(model.config, "model_type", "?")
        level = logging.WARNING if note.startswith("eager (") else logging.INFO
        log.log(level, "attention: %s (%s) runs %s", arch, model_type, note)


def attention_summary(model: Any) -> str:
    """One line for the start-up summary: the attention implementation the (possibly
    wrapped) model runs, and why when `auto` fell back from sdpa."""
    inner = getattr(model, "module", model)
    note = getattr(inner, "bigft_attention", None)
    return str(note) if note else str(attention_implementation(model) or "unknown")


def attention_implementation(model: Any) -> str | None:
    """The attention implementation a loaded (possibly wrapped) model really runs."""
    inner = getattr(model, "module", model)  # DDP / DeepSpeed engines wrap the model
    return getattr(getattr(inner, "config", None), "_attn_implementation", None)
