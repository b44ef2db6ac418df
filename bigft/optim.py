"""Optimizer and learning-rate schedule builders."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from bigft.config import OptimConfig, ScheduleConfig


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms and other 1-D parameters are not weight-decayed."""
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: decayed matrices, and undecayed biases/norms. Frozen params are left out."""
    decay, plain = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (plain if no_decay(name, param) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": plain, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def _adamw(groups: Iterable[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(groups), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


OPTIMIZERS: dict[str, Callable[[Iterable[dict[str, Any]], OptimConfig], torch.optim.Optimizer]] = {
    "adamw": _adamw,
}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The configured optimizer over the model's trainable parameters."""
    return OPTIMIZERS[cfg.name](param_groups(model, cfg.weight_decay), cfg)


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
