"""Load the tokenizer and the model to fine-tune, the way real checkpoints are loaded."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from bigft.config import ModelConfig, QuantConfig
from bigft.errors import ModelError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


def _check_source(name: str, what: str) -> None:
    """A local path that does not exist is a typo, not a hub id: say so before transformers."""
    if _looks_local(name) and not Path(name).expanduser().exists():
        raise ModelError(f"{what} '{name}': directory not found")


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


def _model_class(auto_class: Any, cfg: ModelConfig) -> type | None:
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


def _note_attention(model: Any, requested: str, model_class: type | None) -> None:
    """Record on the model which attention it runs and why, and say it once (rank 0):
    a warning when `auto` had to fall back to eager, info otherwise."""
    runs = attention_implementation(model) or "unknown"
    arch = type(model).__name__
    note = runs if requested != "auto" else f"{runs} (auto)"
    if requested == "auto" and runs == "eager" and model_class is not None:
        note = f"eager ({arch} does not support sdpa"
        if "flash_attention_2" in supported_attention(model_class):
            note += "; its flash_attention_2 needs flash-attn and a GPU"
        note += ")"
    model.bigft_attention = note
    if _global_rank() == 0:
        model_type = getattr(model.config, "model_type", "?")
        level = logging.WARNING if note.startswith("eager (") else logging.INFO
        log.log(level, "attention: %s (%s) runs %s", arch, model_type, note)


def attention_summary(model: Any) -> str:
    """One line for the start-up summary: the attention implementation the (possibly
    wrapped) model runs, and why when `auto` fell back from sdpa."""
    inner = getattr(model, "module", model)
    note = getattr(inner, "bigft_attention", None)
    return str(note) if note else str(attention_implementation(model) or "unknown")


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


def quantization_kwargs(quant: QuantConfig) -> dict[str, Any]:
    """from_pretrained arguments that load linear layers as bitsandbytes 4-bit (QLoRA).

    The whole model goes to this process's device: `device_map` is required by the 4-bit
    loader, and one device per process is what DDP/FSDP expect.
    """
    from bigft.errors import require

    require("bitsandbytes", "quant", "method qlora")
    from transformers import BitsAndBytesConfig

    device: Any = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=_DTYPES[quant.compute_dtype],
        bnb_4bit_quant_storage=getattr(torch, quant.quant_storage),
    )
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():  # ZeRO-3 places and partitions weights itself
        return {"quantization_config": config}
    return {"quantization_config": config, "device_map": {"": device}}


def load_dtype(
    model_dtype: str,
    precision: str = "fp32",
    method: str = "full",
    quant: QuantConfig | None = None,
) -> torch.dtype:
    """The dtype the weights are loaded in: model.dtype, or for 'auto':

    - qlora: `quant.compute_dtype` for every weight that is not 4-bit (embeddings, norms,
      lm_head): they are frozen and only read by matmuls that run in that dtype;
    - lora / dora / freeze under mixed precision (train.precision bf16 / fp16): the
      compute dtype. Frozen weights get no gradient and no optimizer state, and autocast
      casts them to that dtype at every matmul, so fp32 storage would double their memory
      for nothing. `methods.apply_method` keeps what trains in fp32 (see there);
    - full fine-tuning, or fp32 training: float32, the master weights mixed precision
      needs (autocast or the engine computes on bf16 copies).
    """
    if model_dtype != "auto":
        return _DTYPES[model_dtype]
    if quant is not None:
        return _DTYPES[quant.compute_dtype]
    compute = compute_dtype(precision)
    if method in ("lora", "dora", "freeze") and compute is not None:
        return compute
    return torch.float32


def compute_dtype(precision: str) -> torch.dtype | None:
    """The mixed-precision compute dtype of train.precision ('auto' resolved the way the
    Accelerator resolves it); None for fp32 training."""
    from bigft.distributed import resolve_precision

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(precision))


def load_model(
    cfg: ModelConfig,
    precision: str = "fp32",
    quant: QuantConfig | None = None,
    task: str = "causal_lm",
    label_names: list[str] | None = None,
    pad_token_id: int | None = None,
    from_rank0: bool = False,
    method: str = "full",
) -> Any:
    """The model from a local directory or hub id, in the dtype `load_dtype` picks.

    task causal_lm: AutoModelForCausalLM. classification / regression:
    AutoModelForSequenceClassification with a new head of len(label_names) classes (or one
    output), on an encoder or a decoder (which pools its last non-pad token, so it needs
    the pad id). With `quant` (method qlora) the linear layers are loaded as 4-bit
    `Linear4bit`. `method` (method.name) decides what dtype 'auto' means. The attention
    implementation is chosen for the architecture (`choose_attn_implementation`) and
    recorded on the model (`attention_summary`).

    `from_rank0`: the engine copies rank 0's weights to every process when it prepares
    the model (FSDP2 with parallel.fsdp_cpu_ram_efficient_loading), so the other ranks
    build the model without reading any weight (see `_empty_model`). 4-bit models are
    always read by every rank: accelerate does not broadcast them.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from bigft._compat import disable_bnb_cpu_repack

    _check_source(cfg.name_or_path, "model.name_or_path")
    _check_weights_format(cfg.name_or_path, cfg.allow_pickle)
    dtype = load_dtype(cfg.dtype, precision, method, quant)
    extra = quantization_kwargs(quant) if quant is not None else {}
    auto_class: Any = AutoModelForCausalLM
    if task != "causal_lm":
        auto_class = AutoModelForSequenceClassification
        extra.update(_head_kwargs(label_names, pad_token_id))
    model_class = _model_class(auto_class, cfg)
    attn = choose_attn_implementation(cfg.attn_implementation, model_class)
    try:
        if from_rank0 and quant is None and _global_rank() != 0:
            model = _empty_model(auto_class, cfg, dtype, attn, extra)
        else:
            with _every_rank_reads_weights():
                model = auto_class.from_pretrained(
                    cfg.name_or_path,
                    revision=cfg.revision,
                    dtype=dtype,
                    attn_implementation=attn,
                    trust_remote_code=cfg.trust_remote_code,
                    # Pickled weights can run code when loaded; None lets transformers
                    # fall back.
                    use_safetensors=None if cfg.allow_pickle else True,
                    **extra,
                )
    except (OSError, ValueError) as exc:
        raise _load_error(cfg, exc) from None
    if quant is not None:
        disable_bnb_cpu_repack(model)
    model.config.use_cache = False  # training; generation turns it back on explicitly
    _note_attention(model, cfg.attn_implementation, model_class)
    log.info("loaded %s (%s)", cfg.name_or_path, dtype)
    return model


def _global_rank() -> int:
    """This process's rank in the job (0 when not distributed)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextmanager
def _every_rank_reads_weights() -> Iterator[None]:
    """Load with transformers' own FSDP branch off (FSDP_CPU_RAM_EFFICIENT_LOADING, which
    accelerate sets from the plugin). In transformers 5 that branch still reads every
    weight on every rank, and on ranks other than local rank 0 it leaves weights missing
    from the checkpoint (a new classification head) uninitialized: on the meta device, or
    with whatever memory held for a 4-bit model. Harmless for a model that accelerate
    overwrites from rank 0, broken for one it does not (4-bit weights, a distillation
    teacher). bigft decides which ranks read weights itself (`from_rank0`)."""
    key = "FSDP_CPU_RAM_EFFICIENT_LOADING"
    saved = os.environ.pop(key, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[key] = saved


def _empty_model(
    auto_class: Any,
    cfg: ModelConfig,
    dtype: torch.dtype,
    attn: str | None,
    extra: dict[str, Any],
) -> Any:
    """The model's structure with uninitialized parameters, reading no weight file.

    Parameters are created on the meta device and then given `torch.empty` storage: the
    allocation reserves address space that the OS backs with memory only when written,
    and nothing writes it: at prepare FSDP2 moves the model to meta, shards it and fills
    the shards from rank 0. Real storage rather than meta tensors because accelerate maps
    optimizer parameters to their shards by address, and meta tensors all share address
    0. Buffers outside the state dict (rotary frequency tables) are not broadcast, so they
    are built for real, as from_pretrained builds them. `extra` holds only config
    arguments here (a classification head's labels): 4-bit models never come here.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **extra
    )
    with init_empty_weights(include_buffers=False):
        model = auto_class.from_config(
            config, dtype=dtype, attn_implementation=attn, trust_remote_code=cfg.trust_remote_code
        )
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            empty = torch.empty_like(param, device="cpu")
            setattr(module, name, torch.nn.Parameter(empty, requires_grad=param.requires_grad))
    # init_empty_weights re-creates every parameter it registers, which unties tied
    # embeddings; the model's own rule ties them again.
    model.tie_weights()
    log.info(
        "rank %d: built %s without weights; rank 0 sends them", _global_rank(), cfg.name_or_path
    )
    return model


def _check_weights_format(name: str, allow_pickle: bool) -> None:
    """A local model whose weights exist only as pickles is refused before transformers
    sees it, with the one-line conversion; hub ids are checked by `use_safetensors`."""
    path = Path(name).expanduser()
    if allow_pickle or not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in path.glob("pytorch_model*.bin"))
    if pickled:
        convert = (
            f'python -c "from transformers import AutoModelForCausalLM as M; '
            f"M.from_pretrained('{name}').save_pretrained('{name}')\""
        )
        raise ModelError(
            f"model.name_or_path '{name}' holds its weights only as a pickle ({pickled[0]}), "
            f"which can run code when loaded; convert it once, where you trust the file "
            f"({convert}), or set model.allow_pickle=true"
        )


def _load_error(cfg: ModelConfig, exc: BaseException) -> ModelError:
    """transformers' loading errors, reworded where bigft's own settings are the cause."""
    text = str(exc)
    name = cfg.name_or_path
    if "trust_remote_code" in text:
        return ModelError(
            f"model '{name}' ships its own modelling code (auto_map in its config.json), which "
            "bigft runs only with model.trust_remote_code=true: read that code first"
        )
    hint = ""
    if "safetensors" in text and not cfg.allow_pickle:
        hint = " (bigft loads safetensors weights only unless model.allow_pickle=true)"
    return ModelError(f"cannot load model '{name}': {_first_line(exc)}{hint}")


def _head_kwargs(label_names: list[str] | None, pad_token_id: int | None) -> dict[str, Any]:
    """from_pretrained arguments that size and name a sequence-classification head."""
    kwargs: dict[str, Any] = {"pad_token_id": pad_token_id} if pad_token_id is not None else {}
    if label_names is None:
        return {**kwargs, "num_labels": 1, "problem_type": "regression"}
    return {
        **kwargs,
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
        "problem_type": "single_label_classification",
    }


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""

    def numel(p: torch.nn.Parameter) -> int:
        quant_state = getattr(p, "quant_state", None)  # 4-bit: 2+ values per stored element
        if quant_state is not None and getattr(quant_state, "shape", None) is not None:
            return int(quant_state.shape.numel())
        return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 params are partitioned

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return trainable, total


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def attention_implementation(model: Any) -> str | None:
    """The attention implementation a loaded (possibly wrapped) model really runs."""
    inner = getattr(model, "module", model)  # DDP / DeepSpeed engines wrap the model
    return getattr(getattr(inner, "config", None), "_attn_implementation", None)
