"""What is trained: full fine-tuning, layer freezing, LoRA / DoRA / rsLoRA, QLoRA.

`apply_method` runs right after `load_model` (which already loaded a QLoRA base in 4 bits)
and before the optimizer is built: it sets `requires_grad`, wraps the model in peft
adapters where asked, and turns on activation checkpointing. Every method then shares
the one training loop.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from bigft.config import Config, LoraConfig, MethodConfig
from bigft.errors import BigftError, require
from bigft.model.heads import input_embedding_modules, param_ids
from bigft.model.load import compute_dtype, count_parameters, load_dtype
from bigft.model.offload import ActivationOffload, offload_checkpointed_inputs

log = logging.getLogger(__name__)

ADAPTER_METHODS = ("lora", "dora", "qlora")


def find_decoder_layers(model: nn.Module) -> tuple[str, int]:
    """(attribute name, count) of the model's stack of decoder layers, e.g. ('layers', 32).

    The stack is the `nn.ModuleList` with `config.num_hidden_layers` entries; parameter
    names contain `<attribute>.<index>.`, wrapped in peft or not.
    """
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len(module) == (n or len(module)):
            return name.rsplit(".", 1)[-1], len(module)
    raise BigftError(f"{type(model).__name__}: cannot find its decoder layers")


def layer_index(param_name: str, layers_attr: str) -> int | None:
    """Decoder layer a parameter belongs to, from its name; None outside the stack."""
    match = re.search(rf"(?:^|\.){re.escape(layers_attr)}\.(\d+)\.", param_name)
    return int(match.group(1)) if match else None


def apply_freezing(model: Any, cfg: MethodConfig) -> None:
    """method freeze: train everything except the embeddings and/or the lowest layers.

    `train_top_layers: N` is the same as freezing the embeddings and the first L-N layers
    (the final norm and the head stay trainable; N = 0 trains only those).
    """
    layers_attr, n_layers = find_decoder_layers(model)
    freeze_below, freeze_embeddings = cfg.freeze_first_layers, cfg.freeze_embeddings
    if cfg.train_top_layers is not None:
        if cfg.train_top_layers > n_layers:
            raise BigftError(
                f"method.train_top_layers {cfg.train_top_layers} > the model's {n_layers} layers"
            )
        freeze_below, freeze_embeddings = n_layers - cfg.train_top_layers, True
    if freeze_below > n_layers:
        raise BigftError(
            f"method.freeze_first_layers {freeze_below} > the model's {n_layers} layers"
        )
    # Encoders keep position / token-type embeddings and their norm in one `embeddings`
    # module, vision models a stem: freezing the embeddings freezes all of it.
    embedding_ids = param_ids(input_embedding_modules(model))
    for name, param in model.named_parameters():
        index = layer_index(name, layers_attr)
        frozen = (freeze_embeddings and id(param) in embedding_ids) or (
            index is not None and index < freeze_below
        )
        param.requires_grad_(not frozen)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if freeze_embeddings and head is not None and head.weight.requires_grad is False:
        log.warning("the head is tied to the input embeddings, so it is frozen too")


# peft's task type per task: SEQ_CLS trains and saves the new classification head; an
# image classifier's head (`classifier`) is trained and saved through modules_to_save.
PEFT_TASK_TYPES = {
    "causal_lm": "CAUSAL_LM",
    "classification": "SEQ_CLS",
    "regression": "SEQ_CLS",
    "preference": "CAUSAL_LM",
}


def lora_config(cfg: LoraConfig, use_dora: bool, task_type: str | None = "CAUSAL_LM") -> Any:
    """The peft LoraConfig; task_type SEQ_CLS also trains the new classification head."""
    import peft

    to_save = list(cfg.modules_to_save)
    return peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        modules_to_save=to_save or None,
        use_rslora=cfg.use_rslora,
        use_dora=use_dora,
        task_type=task_type,
    )


def apply_adapters(model: Any, cfg: MethodConfig, task_type: str | None = "CAUSAL_LM") -> Any:
    """Wrap the (frozen) base in peft LoRA/DoRA adapters; QLoRA bases are prepared first."""
    require("peft", "lora", f"method {cfg.name}")
    import peft

    if cfg.name == "qlora":
        require("bitsandbytes", "quant", "method qlora")
        if not getattr(model, "is_loaded_in_4bit", False):
            raise BigftError("method qlora: the model was not loaded in 4 bits")
        # Not peft.prepare_model_for_kbit_training: it casts every weight that is not 4-bit
        # (embeddings, norms, lm_head) to fp32, +2 GB on an 8B model for weights that are
        # frozen and only read by bf16 matmuls. Its other parts are done here: the base is
        # frozen, and `apply_checkpointing` makes the inputs require grad.
        model.requires_grad_(False)
    try:
        config = lora_config(cfg.lora, use_dora=cfg.name == "dora", task_type=task_type)
        return peft.get_peft_model(model, config)
    except ValueError as exc:
        raise BigftError(f"method.lora: {exc}") from None


def apply_checkpointing(model: Any, cfg: MethodConfig) -> None:
    """Non-reentrant activation checkpointing of every (or every k-th) decoder layer.

    Input embeddings are made to require grad, so gradients reach adapters inside a
    checkpointed layer whose inputs would otherwise all be frozen.
    """
    if cfg.gradient_checkpointing == "off":
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise BigftError(f"{type(base).__name__} does not support gradient checkpointing")
    every = cfg.checkpoint_every_k if cfg.gradient_checkpointing == "every_k" else 1
    base.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=every or 1
    )
    base.enable_input_require_grads()
    # Without an accelerator activations already live in host memory.
    if cfg.offload_activations and torch.cuda.is_available():
        layers = offload_checkpointed_inputs(base, ActivationOffload())
        log.info("offload_activations: %d checkpointed layers keep inputs in host memory", layers)
    elif cfg.offload_activations:
        log.info("offload_activations: no GPU, activations are in host memory already")


def apply_precision_layout(model: Any, cfg: Config) -> None:
    """With `model.dtype: auto` under mixed precision: frozen weights in the dtype
    `model.load_dtype` gives them (the compute dtype for lora / dora / freeze / qlora),
    trainable ones in fp32 where the engine expects fp32 master weights in the module.

    Per engine (parallel.strategy):
    - ddp (and one process): accelerate's autocast computes in bf16/fp16 and the optimizer
      steps on the module's own parameters, so trainable weights are made fp32 here
      (peft's adapters already are; freeze's layers, modules_to_save, heads are not);
    - fsdp2: accelerate's prepare upcasts every trainable parameter to fp32 (FSDP2 needs
      one dtype per group of trainable parameters) and shards it as the fp32 master; the
      frozen bf16 ones are left as they are, so nothing is done here (on ranks other than
      0 the weights are still unwritten memory, which a cast would touch);
    - zero1/2/3: DeepSpeed's bf16/fp16 engine casts the whole module to the compute dtype
      and keeps its own fp32 master copy in the optimizer, so nothing is done here.

    Frozen weights loaded in another dtype (a caller that did not pass `method` to
    `load_model`) are cast down here; ZeRO-3 partitions and 4-bit weights are never cast.
    An explicit model.dtype (e.g. float32) is left exactly as loaded.
    """
    if cfg.model.dtype != "auto" or compute_dtype(cfg.train.precision) is None:
        return
    quant = cfg.method.quant if cfg.method.name == "qlora" else None
    frozen = load_dtype(cfg.model.dtype, cfg.train.precision, cfg.method.name, quant)
    master = cfg.parallel.strategy == "ddp"
    for param in model.parameters():
        if (
            not param.is_floating_point()
            or hasattr(param, "ds_numel")
            or type(param).__name__ == "Params4bit"
        ):
            continue
        wanted = torch.float32 if param.requires_grad else frozen
        if param.dtype != wanted and (master or not param.requires_grad):
            param.data = param.data.to(wanted)


def apply_method(model: Any, cfg: Config) -> Any:
    """Prepare a loaded model for the configured method; returns the model to train."""
    method = cfg.method
    if method.name == "freeze":
        apply_freezing(model, method)
    elif method.name in ADAPTER_METHODS:
        if cfg.task == "image_classification" and not method.lora.modules_to_save:
            lora = method.lora.model_copy(update={"modules_to_save": ["classifier"]})
            method = method.model_copy(update={"lora": lora})
        model = apply_adapters(model, method, PEFT_TASK_TYPES.get(cfg.task))
    if cfg.task == "contrastive" and not cfg.contrastive.learn_temperature:
        for name, param in model.named_parameters():
            if name.endswith("logit_scale"):
                param.requires_grad_(False)
    apply_precision_layout(model, cfg)
    if method.tiled_mlp:
        from bigft.model.tiled_mlp import apply_tiled_mlp

        tiled = apply_tiled_mlp(model, method.tiled_mlp_shards)
        log.info("tiled_mlp: %d decoder MLPs run in tiles", tiled)
    apply_checkpointing(model, method)
    trainable, total = count_parameters(model)  # ZeRO-3 aware
    if trainable == 0:
        raise BigftError(f"method {method.name}: no parameter is left to train")
    log.info(
        "method %s: %s / %s parameters trainable (%.3f%%)",
        method.name,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(total, 1),
    )
    return model
