"""Load the tokenizer and the model to fine-tune, the way real checkpoints are loaded."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from bigft.config import IMAGE_TASKS, Config, ModelConfig, QuantConfig
from bigft.engine.settings import global_rank, resolve_precision
from bigft.errors import ModelError
from bigft.model.attention import choose_attn_implementation, note_attention, resolve_model_class
from bigft.model.checks import (
    IMAGE_PROCESSOR_FILES,
    check_model_dir,
    check_tokenizer_files,
    first_line,
    holds_preprocessor,
    load_error,
)

log = logging.getLogger(__name__)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    check_tokenizer_files(name, what)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load tokenizer '{name}': {first_line(exc)}") from None
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of loss and attention, so reusing EOS is safe;
        # adding a new token would change the embedding size of a pretrained model.
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer '{name}' has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_preprocessor(cfg: Config) -> Any:
    """What turns rows into model inputs: the tokenizer (`load_tokenizer`); for task
    image_classification the model's image processor, for task contrastive its processor
    (image processor and tokenizer), from model.tokenizer or the model's directory."""
    if cfg.task not in IMAGE_TASKS:
        return load_tokenizer(cfg.model)
    from transformers import AutoImageProcessor, AutoProcessor

    name = cfg.model.tokenizer or cfg.model.name_or_path
    what = "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path"
    if cfg.model.tokenizer is None:
        check_model_dir(name, what, cfg.model.allow_pickle)
    local = Path(name).expanduser()
    if local.is_dir() and not holds_preprocessor(local, IMAGE_PROCESSOR_FILES):
        raise ModelError(
            f"{what} '{name}' holds no image processor (preprocessor_config.json): save the "
            "base model's with AutoImageProcessor.from_pretrained(base).save_pretrained(dir), "
            "or set model.tokenizer to a directory that holds one"
        )
    auto: Any = AutoImageProcessor if cfg.task == "image_classification" else AutoProcessor
    try:
        processor = auto.from_pretrained(
            name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"cannot load the processor of '{name}': {first_line(exc)}") from None
    if cfg.task == "contrastive" and not hasattr(processor, "tokenizer"):
        raise ModelError(
            f"{what} '{name}': task contrastive needs a processor with a tokenizer and an "
            "image processor (e.g. CLIPProcessor); this directory has only an image processor"
        )
    return processor


def pad_token_id(preprocessor: Any) -> int | None:
    """The pad id of a tokenizer or of a processor's tokenizer; None for images alone."""
    tokenizer = getattr(preprocessor, "tokenizer", preprocessor)
    return getattr(tokenizer, "pad_token_id", None)


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

    from bigft._compat import disable_bnb_cpu_repack

    check_model_dir(cfg.name_or_path, what, cfg.allow_pickle)
    dtype = load_dtype(cfg.dtype, precision, method, quant)
    extra = quantization_kwargs(quant) if quant is not None else {}
    auto_class = auto_class_for(task)
    if task in ("classification", "regression", "image_classification"):
        extra.update(_head_kwargs(label_names, pad_token_id))
    if task == "image_classification":
        extra["ignore_mismatched_sizes"] = True  # a base trained for other classes
    model_class = resolve_model_class(auto_class, cfg)
    attn = choose_attn_implementation(cfg.attn_implementation, model_class)
    try:
        if from_rank0 and quant is None and global_rank() != 0:
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
        raise load_error(cfg, exc, what) from None
    except RuntimeError as exc:
        if "ignore_mismatched_sizes" not in str(exc):
            raise
        # A weight whose shape config.json contradicts (vocab_size, hidden_size edited).
        raise ModelError(
            f"{what}: the weights of '{cfg.name_or_path}' do not have the shapes its "
            "config.json declares (e.g. vocab_size); restore the config.json saved with them"
        ) from None
    # Also a model saved in 4 bits (a quantized export) reloaded without method qlora.
    if quant is not None or getattr(model, "is_loaded_in_4bit", False):
        disable_bnb_cpu_repack(model)
    if task == "image_classification":
        from bigft.model.heads import replace_head_if_relabelled

        replace_head_if_relabelled(model, cfg.name_or_path, label_names or [])
    model.config.use_cache = False  # training; generation turns it back on explicitly
    note_attention(model, cfg.attn_implementation, model_class)
    log.info("loaded %s (%s)", cfg.name_or_path, dtype)
    return model


def auto_class_for(task: str) -> Any:
    """The transformers Auto class of a task's model."""
    import transformers

    return getattr(
        transformers,
        {
            "causal_lm": "AutoModelForCausalLM",
            "classification": "AutoModelForSequenceClassification",
            "regression": "AutoModelForSequenceClassification",
            "image_classification": "AutoModelForImageClassification",
            "contrastive": "AutoModel",
            "preference": "AutoModelForCausalLM",
        }[task],
    )


def load_configured_model(
    cfg: Config,
    label_names: list[str] | None,
    pad_token_id: int | None,
    method: str,
    from_rank0: bool = False,
) -> Any:
    """The model `cfg` fine-tunes or evaluates, loaded for `method` ('qlora': the base in
    4 bits as method.quant says; 'full': as trained weights are read back)."""
    return load_model(
        cfg.model,
        cfg.train.precision,
        cfg.method.quant if method == "qlora" else None,
        cfg.task,
        label_names,
        pad_token_id,
        from_rank0=from_rank0,
        method=method,
    )


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
        "rank %d: built %s without weights; rank 0 sends them", global_rank(), cfg.name_or_path
    )
    return model


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
    """(trainable, total) parameter counts of the whole model, however an engine holds it:
    ZeRO-3 partitions and FSDP2 shards count whole, 4-bit weights by the values they pack
    (2 or more per stored element). FSDP2 replaces a 4-bit weight by a DTensor shard that
    drops its quant_state; bitsandbytes keeps a copy on the layer, which is read then."""
    counted: set[int] = set()
    trainable = total = 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in counted:  # tied weights count once
                continue
            counted.add(id(param))
            quant_state = getattr(param, "quant_state", None)
            if quant_state is None and name == "weight":
                quant_state = getattr(module, "quant_state", None)
            if quant_state is not None and getattr(quant_state, "shape", None) is not None:
                numel = int(quant_state.shape.numel())
            else:
                numel = int(getattr(param, "ds_numel", param.numel()))
            total += numel
            trainable += numel if param.requires_grad else 0
    return trainable, total
