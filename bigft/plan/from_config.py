"""A Workload from a bigft Config: what `bigft plan CONFIG` and the trainer plan.

`workload_from_config` reads the config with getattr defaults, so sections and fields
added later (LoRA settings, a parallel section) are picked up without changes here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from bigft.errors import BigftError, ConfigError
from bigft.plan.arch import EAGER_ONLY, LINEARS, load_arch
from bigft.plan.hardware import GPU
from bigft.plan.workload import Workload


def _get(obj: Any, names: tuple[str, ...], default: Any) -> Any:
    """The first attribute of `obj` among `names` that is set (config fields may come)."""
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return default


def _checkpointing(sections: tuple[Any, ...]) -> tuple[bool, int]:
    """(on, every k layers) from method.gradient_checkpointing ('off' | 'full' | 'every_k')
    or a boolean field elsewhere."""
    for section in sections:
        mode = _get(section, ("gradient_checkpointing", "grad_ckpt"), None)
        if mode is None:
            continue
        if isinstance(mode, str):
            every = int(_get(section, ("checkpoint_every_k",), None) or 1)
            return mode != "off", every if mode == "every_k" else 1
        return bool(mode), 1
    return False, 1


_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _weight_dtype(model: Any, method: Any) -> str:
    """model.dtype as the Workload spells it; for qlora with 'auto' the weights that are
    not 4-bit load in method.quant.compute_dtype (bigft.model.load.load_dtype)."""
    dtype = str(getattr(model, "dtype", "auto"))
    if dtype == "auto" and _get(method, ("name",), None) == "qlora":
        dtype = str(getattr(getattr(method, "quant", None), "compute_dtype", "auto"))
    return _DTYPE_NAMES.get(dtype, "auto")


def planned_gpu(cfg: Any) -> GPU | None:
    """The catalogue GPU a config names in hardware.gpu (None when it names none)."""
    from bigft.plan.hardware import get_gpu

    name = getattr(getattr(cfg, "hardware", None), "gpu", None)
    return get_gpu(name) if name else None


# Classes planned for when a classification config does not list them (data.label_names):
# the head's logits are B x L x classes, megabytes either way.
UNLISTED_CLASSES = 100


def sequence_labels(cfg: Any) -> int | None:
    """Outputs of the sequence head a classification / regression config trains (None for
    a causal LM): len(data.label_names), UNLISTED_CLASSES when unlisted, 1 for regression."""
    task = str(getattr(cfg, "task", "causal_lm"))
    if task in ("causal_lm", "preference"):
        return None
    if task == "regression":
        return 1
    names = getattr(getattr(cfg, "data", None), "label_names", None)
    return len(names) if names else UNLISTED_CLASSES


def sequences_per_row(cfg: Any) -> int:
    """Sequences one row of the config's data puts through the model: 2 for task
    preference (chosen and rejected; KTO's row and its mismatched copy), else 1. The
    planner's micro-batch and global batch count sequences."""
    return 2 if str(getattr(cfg, "task", "")) == "preference" else 1


def workload_from_config(cfg: Any, **flags: Any) -> Workload:
    """A Workload from a bigft Config; keyword flags (not None) override it."""
    method = getattr(cfg, "method", None)
    lora = getattr(method, "lora", None) or method  # method.lora.r, or flat fields
    train = getattr(cfg, "train", None)
    model = getattr(cfg, "model", None)
    parallel = getattr(cfg, "parallel", None) or getattr(cfg, "distributed", None)
    slurm = getattr(cfg, "slurm", None)  # its nodes / gpus_per_node, when no parallel section
    hardware = getattr(cfg, "hardware", None)  # the GPUs the config is written for
    targets = _get(lora, ("target_modules", "lora_targets", "targets"), LINEARS)
    if isinstance(targets, str):
        targets = LINEARS if targets in ("all-linear", "all_linear") else (targets,)
    precision = str(getattr(train, "precision", "auto"))
    attn = str(getattr(model, "attn_implementation", "auto"))
    strategy = str(_get(parallel, ("strategy", "engine"), "ddp"))
    offload = _get(parallel, ("offload_params",), False) or _get(
        parallel, ("offload_optimizer",), False
    )
    if strategy == "zero3" and offload:
        strategy = "zero3-offload"
    ckpt, every = _checkpointing((method, train, model))
    top = _get(method, ("train_top_layers", "trainable_layers"), None)
    values: dict[str, Any] = {
        "method": _get(method, ("name",), "full"),
        "strategy": strategy,
        "reduce_bucket": _get(parallel, ("reduce_bucket_size",), None),
        "lora_rank": int(_get(lora, ("r", "lora_rank", "rank"), 16)),
        "lora_dropout": float(_get(lora, ("dropout", "lora_dropout"), 0.0)),
        "lora_targets": tuple(t for t in targets if t != "lm_head"),
        "trainable_layers": top,
        "freeze_embeddings": bool(top is not None or _get(method, ("freeze_embeddings",), True)),
        "seq_len": int(getattr(train, "seq_len", 2048)),
        "grad_ckpt": ckpt,
        "ckpt_every": every,
        "precision": "bf16" if precision == "auto" else precision,
        "weight_dtype": _weight_dtype(model, method),
        "optimizer": str(getattr(getattr(cfg, "optim", None), "name", "adamw")),
        "attn": "sdpa" if attn == "auto" else attn,
        "gpus_per_node": int(
            _get(hardware, ("gpus_per_node",), None)
            or _get(parallel, ("gpus_per_node",), None)
            or getattr(slurm, "gpus_per_node", 0)
            or 1
        ),
        "nodes": int(
            _get(hardware, ("nodes",), None)
            or _get(parallel, ("nodes", "num_nodes"), None)
            or getattr(slurm, "nodes", 1)
            or 1
        ),
    }
    micro = getattr(train, "micro_batch_size", 1)
    values["micro_batch"] = micro if isinstance(micro, int) else 1
    values["loss_impl"] = str(getattr(train, "loss_impl", "auto"))
    values["loss_chunk"] = int(getattr(train, "loss_chunk", 256))
    values["compile"] = bool(getattr(train, "compile", False))
    values["offload_activations"] = bool(_get(method, ("offload_activations",), False))
    values["tiled_mlp"] = bool(_get(method, ("tiled_mlp",), False))
    values["tiled_mlp_shards"] = _get(method, ("tiled_mlp_shards",), None)
    adapted = (*targets, *(_get(lora, ("modules_to_save",), None) or ()))
    if values["loss_impl"] == "auto" and values["method"] not in ("full", "freeze"):
        values["loss_impl"] = "full" if "lm_head" in adapted else "auto"  # not a plain Linear
    if str(getattr(cfg, "task", "")) == "preference":
        # Chosen and rejected run in one forward: twice the sequences, and the loss reads
        # each sequence's log-probabilities from the full logits.
        values["micro_batch"] *= sequences_per_row(cfg)
        values["loss_impl"] = "full"
        pref = getattr(cfg, "preference", None)
        loss = str(getattr(pref, "loss", "dpo"))
        precomputed = bool(getattr(pref, "precompute_reference", False))
        values["reference_copy"] = (
            values["method"] in ("full", "freeze")
            and loss in ("dpo", "ipo", "kto")
            and not precomputed
        )
    values.update({k: v for k, v in flags.items() if v is not None})
    name = flags.get("model") or getattr(model, "name_or_path", None)
    values.pop("model", None)
    if not name:
        raise ConfigError("bigft plan needs a CONFIG or --model NAME_OR_PATH")
    arch = load_arch(str(name))
    labels = sequence_labels(cfg)
    if labels is not None:
        arch = replace(arch, num_labels=labels)
    if arch.model_type in EAGER_ONLY:
        values["attn"] = "eager"
    below = _get(method, ("freeze_first_layers",), 0)
    if values["method"] == "freeze" and top is None and below:
        values.setdefault("trainable_layers", None)
        values["trainable_layers"] = max(arch.layers - int(below), 0)
    if flags.get("grad_ckpt") is not None and flags.get("ckpt_every") is None:
        values["ckpt_every"] = 1 if not flags["grad_ckpt"] else values["ckpt_every"]
    try:
        return Workload(arch=arch, **values)
    except TypeError as exc:  # a flag the planner does not know
        raise BigftError(f"bigft plan: {exc}") from None
