"""Optimizer and learning-rate schedule builders."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bigft.config import OptimConfig, ScheduleConfig
from bigft.errors import BigftError, require
from bigft.methods import find_decoder_layers, layer_index

log = logging.getLogger(__name__)

OptimizerBuilder = Callable[[Iterable[dict[str, Any]], OptimConfig], torch.optim.Optimizer]


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms and other 1-D parameters are not weight-decayed."""
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


@dataclass(frozen=True)
class LrRules:
    """Learning rate per parameter: optim.lr, layer-wise decay, per-part overrides."""

    lr: float
    layer_decay: float | None = None
    lr_adapters: float | None = None
    lr_head: float | None = None
    lr_embeddings: float | None = None

    @classmethod
    def from_config(cls, cfg: OptimConfig) -> LrRules:
        return cls(cfg.lr, cfg.layer_decay, cfg.lr_adapters, cfg.lr_head, cfg.lr_embeddings)


def _part_ids(model: nn.Module, getter: str) -> set[int]:
    module = getattr(model, getter, lambda: None)()
    return {id(p) for p in module.parameters()} if module is not None else set()


def _lr_and_label(
    name: str, param: nn.Parameter, rules: LrRules, parts: dict[str, Any]
) -> tuple[float, str]:
    """(lr, group label) of one parameter. Depth from the top: head and final norm 0,
    decoder layer i of L: L - i, embeddings L + 1. Explicit head/embedding lrs are used
    as given; adapters start from lr_adapters and are decayed like their layer."""
    n_layers: int = parts["n_layers"]
    index = layer_index(name, parts["layers_attr"]) if n_layers else None
    is_adapter = "lora_" in name
    if id(param) in parts["head"] and not is_adapter:
        return (rules.lr_head or rules.lr), "head"
    if id(param) in parts["embeddings"] and not is_adapter:
        if rules.lr_embeddings is not None:
            return rules.lr_embeddings, "embeddings"
        depth, label = n_layers + 1, "embeddings"
    elif index is not None:
        depth, label = n_layers - index, f"layer{index}"
    else:
        depth, label = 0, "top"
    base = rules.lr_adapters if is_adapter and rules.lr_adapters is not None else rules.lr
    label = f"{label}.adapters" if is_adapter else label
    return base * (rules.layer_decay or 1.0) ** depth, label


def param_groups(
    model: nn.Module, weight_decay: float, rules: LrRules | None = None
) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (lr, decay / no decay); frozen ones are left out.

    Without `rules` every group has the optimizer's lr: two groups, decayed matrices and
    undecayed biases/norms. Groups carry a readable `name` for the start-up summary.
    """
    parts: dict[str, Any] = {"n_layers": 0, "layers_attr": "layers"}
    if rules is not None:
        parts["head"] = _part_ids(model, "get_output_embeddings")
        parts["embeddings"] = _part_ids(model, "get_input_embeddings")
        with contextlib.suppress(BigftError):
            parts["layers_attr"], parts["n_layers"] = find_decoder_layers(model)
    groups: dict[tuple[float | None, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr, label = _lr_and_label(name, param, rules, parts) if rules else (None, "")
        plain = no_decay(name, param)
        group = groups.setdefault(
            (lr, plain),
            {
                "params": [],
                "weight_decay": 0.0 if plain else weight_decay,
                "name": "no_decay" if plain else "decay",
                "labels": [],
            },
        )
        if lr is not None:
            group["lr"] = lr
        group["params"].append(param)
        if label and label not in group["labels"]:
            group["labels"].append(label)
    result = []
    for group in groups.values():
        labels = group.pop("labels")
        if rules is not None and labels:
            group["name"] = f"{_span(labels)}/{group['name']}"
        result.append(group)
    return result


def _span(labels: list[str]) -> str:
    return labels[0] if len(labels) == 1 else f"{labels[0]}..{labels[-1]}({len(labels)})"


def describe_groups(optimizer: torch.optim.Optimizer) -> str:
    """One line per parameter group: name, parameters, lr, weight decay."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # unwrap Accelerate's wrapper
    lines = [f"optimizer {type(optimizer).__name__}: {len(optimizer.param_groups)} group(s)"]
    for group in optimizer.param_groups:
        count = sum(p.numel() for p in group["params"])
        lines.append(
            f"  {group.get('name', '?'):<32} {count:>12,} params  lr {group['lr']:.3g}  "
            f"wd {group.get('weight_decay', 0.0):g}"
        )
    return "\n".join(lines)


def _adamw(groups: Iterable[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(groups), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def _bnb_adamw(paged: bool) -> OptimizerBuilder:
    def build(groups: Iterable[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
        name = "paged_adamw_8bit" if paged else "adamw_8bit"
        require("bitsandbytes", "quant", f"optim {name}")
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
        return cls(list(groups), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)

    return build


def _adafactor(groups: Iterable[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    # torch's Adafactor: factored second moment, no first moment; lr is used as given.
    return torch.optim.Adafactor(list(groups), lr=cfg.lr)


def _sgd(groups: Iterable[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(list(groups), lr=cfg.lr, momentum=cfg.momentum)


OPTIMIZERS: dict[str, OptimizerBuilder] = {
    "adamw": _adamw,
    "adamw_8bit": _bnb_adamw(paged=False),
    "paged_adamw_8bit": _bnb_adamw(paged=True),
    "adafactor": _adafactor,
    "sgd": _sgd,
}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The configured optimizer over the model's trainable parameters, grouped by lr."""
    per_part = (cfg.layer_decay, cfg.lr_adapters, cfg.lr_head, cfg.lr_embeddings)
    rules = LrRules.from_config(cfg) if any(v is not None for v in per_part) else None
    optimizer = OPTIMIZERS[cfg.name](param_groups(model, cfg.weight_decay, rules), cfg)
    log.info("%s", describe_groups(optimizer))
    return optimizer


def warmup_steps(cfg: ScheduleConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    return math.ceil(cfg.warmup_ratio * total_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup, then linear / cosine (to min_lr_ratio) / constant."""
    from transformers import get_scheduler

    warmup = warmup_steps(cfg, total_steps)
    if cfg.name == "cosine":
        return get_scheduler(
            "cosine_with_min_lr",
            optimizer,
            num_warmup_steps=warmup,
            num_training_steps=total_steps,
            scheduler_specific_kwargs={"min_lr_rate": cfg.min_lr_ratio},
        )
    name = "linear" if cfg.name == "linear" else "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
