"""Load the tokenizer and the model to fine-tune, the way real checkpoints are loaded."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from bigft.config import ModelConfig, QuantConfig
from bigft.errors import ModelError
from bigft.precision import resolve_precision

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


def _check_source(name: str, what: str) -> None:
    """A local path that does not exist is a typo, not a hub id: say so before transformers."""
    path = Path(name).expanduser()
    if _looks_local(name) and not path.exists():
        raise ModelError(
            f"{what} '{name}': directory not found; check the path (a hub id such as "
            "org/model has no leading '/', '.' or '~')"
        )
    if _looks_local(name) and not path.is_dir():
        raise ModelError(
            f"{what} '{name}' is a file, not a model directory; give the directory that "
            "holds config.json and the weights"
        )


# What transformers tokenizers are saved as (vocabularies, sentencepiece and tiktoken
# models, their configs: byte-level tokenizers have a config alone); a directory with
# none of them holds no tokenizer at all.
TOKENIZER_FILES = (
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "*.model",
    "*.spm",
    "*.tiktoken",
)
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter: transformers loads its base


def check_model_dir(
    name: str, what: str = "model.name_or_path", allow_pickle: bool = False
) -> None:
    """File-level checks of a local model directory, before transformers reads it.

    A missing directory, a missing or unparsable config.json, no weights, pickled weights
    (unless `allow_pickle`), and a 0-byte or truncated safetensors file are each a
    one-line ModelError naming `what` (the config key) and the file. transformers would
    otherwise fail deep inside loading, or blame the tokenizer, which it reads first. Hub
    ids are left to transformers.
    """
    _check_source(name, what)
    path = Path(name).expanduser()
    if not _looks_local(name):
        return
    config = path / "config.json"
    if not config.is_file() and (path / ADAPTER_CONFIG).is_file():
        return  # the base it names is checked by transformers
    if not config.is_file():
        raise ModelError(
            f"{what} '{name}' has no config.json; give a directory written by "
            "save_pretrained (config.json beside the weights)"
        )
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(
            f"{what} '{name}': {config.name} is not valid JSON ({_first_line(exc)}); restore it "
            "from the original model"
        ) from None
    if not isinstance(parsed, dict):
        raise ModelError(
            f"{what} '{name}': {config.name} does not hold a JSON object; restore it from "
            "the original model"
        )
    _check_weights_format(name, allow_pickle, what)
    _check_weight_files(path, name, what)


def _check_weight_files(path: Path, name: str, what: str) -> None:
    """Every safetensors file (and each shard an index names) is present and whole."""
    files = sorted(path.glob("*.safetensors"))
    if not files and not any(path.glob("pytorch_model*.bin")):
        raise ModelError(
            f"{what} '{name}' holds no weights (model.safetensors); give the directory the "
            "model was saved to with save_pretrained"
        )
    for index in sorted(path.glob("*.safetensors.index.json")):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise ModelError(
                f"{what} '{name}': {index.name} is not a valid shard index; copy or download "
                "the model again"
            ) from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ModelError(
                f"{what} '{name}': {missing[0]} is missing (listed in {index.name}); copy or "
                "download the model again"
            )
    for file in files:
        problem = safetensors_problem(file)
        if problem is not None:
            raise ModelError(f"{what} '{name}': {problem}; copy or download the model again")


def safetensors_problem(file: Path) -> str | None:
    """Why `file` is not a whole safetensors file, or None: a cheap check (the header
    alone is read) that its header parses and the tensors it declares end exactly at the
    end of the file, which a 0-byte, truncated or overwritten file fails."""
    try:
        size = file.stat().st_size
        with file.open("rb") as fh:
            prefix = fh.read(8)
            if size == 0:
                return f"{file.name} is empty (0 bytes)"
            if len(prefix) < 8:
                return f"{file.name} is truncated ({size} bytes, shorter than a header)"
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                return (
                    f"{file.name} is truncated ({size} bytes; its header alone declares "
                    f"{header_len + 8})"
                )
            header = json.loads(fh.read(header_len))
    except OSError as exc:
        return f"{file.name} cannot be read ({exc.strerror or exc})"
    except (UnicodeDecodeError, ValueError):
        return f"{file.name} is not a safetensors file (its header is not valid JSON)"
    try:
        end = max(
            (int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"),
            default=0,
        )
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return f"{file.name} is not a safetensors file (its header lists no tensor offsets)"
    expected = 8 + header_len + end
    if size < expected:
        return f"{file.name} is truncated ({size} bytes; its header declares {expected})"
    if size > expected:
        return f"{file.name} is corrupt ({size} bytes; its header declares {expected})"
    return None


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
    """Tokenizer from model.tokenizer (or the model's directory), with a pad token.

    The model directory is checked first (`check_model_dir`): transformers reads its
    config.json to pick the tokenizer class, and would blame a broken one on the tokenizer.
    """
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.name_or_path
    what = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    if cfg.tokenizer is None:
        check_model_dir(cfg.name_or_path, what, cfg.allow_pickle)
    _check_tokenizer_files(name, what)
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


def _check_tokenizer_files(name: str, what: str) -> None:
    """A local tokenizer source must hold a tokenizer (a fine-tuned model saved without
    one is a common slip); its config.json, if any, must parse."""
    _check_source(name, what)
    path = Path(name).expanduser()
    if not _looks_local(name):
        return
    config = path / "config.json"
    if config.is_file():
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ModelError(
                f"{what} '{name}': {config.name} is not valid JSON ({_first_line(exc)}); "
                "restore it from the original model"
            ) from None
    if not any(f.is_file() for pattern in TOKENIZER_FILES for f in path.glob(pattern)):
        hint = (
            "set model.tokenizer to the directory of the tokenizer it was trained with (e.g. "
            "its base model), or save the tokenizer into it (tokenizer.save_pretrained)"
            if what == "model.name_or_path"
            else "point model.tokenizer at a directory that holds one"
        )
        raise ModelError(
            f"{what} '{name}' holds no tokenizer (no tokenizer.json, tokenizer.model, "
            f"vocab.json or the like); {hint}"
        )


def context_limit(config: Any) -> tuple[int, str] | None:
    """(positions the model can attend over, where that number comes from) read from a
    transformers config, or None when the config states no limit.

    Rope scaling counts: a linear / dynamic / yarn factor stretches max_position_embeddings
    unless the config already states the stretched length (llama3, or an
    original_max_position_embeddings below it).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            break
    else:
        return None
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
    if not isinstance(rope, dict):
        return value, attr
    kind = rope.get("rope_type", rope.get("type", "default"))
    factor = rope.get("factor")
    original = rope.get("original_max_position_embeddings")
    stretched = isinstance(original, int) and original < value
    if kind in ("default", "llama3") or not isinstance(factor, int | float) or stretched:
        return value, attr
    if factor <= 1:
        return value, attr
    return int(value * factor), f"{attr} {value} x rope factor {factor}"


def check_model_config(cfg: ModelConfig, seq_len: int, what: str = "model.name_or_path") -> None:
    """The model's configuration loads (an unknown architecture, code it ships that is not
    trusted: the same ModelError loading would give, before any data is read or file
    written), and train.seq_len fits its positions.

    bigft refuses a train.seq_len beyond the model's position limit (`context_limit` of its
    config.json): learned position embeddings fail with an index error past it, and
    rotary models degrade silently; the message says to lower seq_len or configure rope
    scaling.
    """
    from transformers import AutoConfig

    local = Path(cfg.name_or_path).expanduser()
    if _looks_local(cfg.name_or_path) and not (local / "config.json").is_file():
        return  # a PEFT adapter directory: its base is read when the model loads
    try:
        config = AutoConfig.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise _load_error(cfg, exc, what) from None
    found = context_limit(config)
    if found is None or seq_len <= found[0]:
        return
    limit, source = found
    raise ModelError(
        f"train.seq_len {seq_len} is longer than model '{cfg.name_or_path}' supports: "
        f"{limit} positions ({source} in its config.json); lower train.seq_len to {limit} or "
        "less, or extend the model's context with rope scaling in its config.json "
        '(rope_scaling, e.g. {"rope_type": "linear", "factor": 2.0}) if it uses '
        "rotary positions"
    )


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
    what: str = "model.name_or_path",
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

    `what` names the config key the model comes from (distill.teacher for a teacher) in
    errors; the directory is checked first (`check_model_dir`).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from bigft._compat import disable_bnb_cpu_repack

    check_model_dir(cfg.name_or_path, what, cfg.allow_pickle)
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
    except (OSError, ValueError, SafetensorError) as exc:
        raise _load_error(cfg, exc, what) from None
    except RuntimeError as exc:
        if "ignore_mismatched_sizes" not in str(exc):
            raise
        # A weight whose shape config.json contradicts (vocab_size, hidden_size edited).
        raise ModelError(
            f"{what}: the weights of '{cfg.name_or_path}' do not have the shapes its "
            "config.json declares (e.g. vocab_size); restore the config.json saved with them"
        ) from None
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


def _check_weights_format(name: str, allow_pickle: bool, what: str = "model.name_or_path") -> None:
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
            f"{what} '{name}' holds its weights only as a pickle ({pickled[0]}), "
            f"which can run code when loaded; convert it once, where you trust the file "
            f"({convert}), or set model.allow_pickle=true"
        )


def _load_error(cfg: ModelConfig, exc: BaseException, what: str) -> ModelError:
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
    return ModelError(f"{what}: cannot load model '{name}': {_first_line(exc)}{hint}")


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
