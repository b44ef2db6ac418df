"""Optimizer and learning-rate schedule builders."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bigft.config import OptimConfig, ScheduleConfig
from bigft.errors import BigftError, ConfigError, require
from bigft.model.heads import head_modules, input_embedding_modules, param_ids
from bigft.model.methods import find_decoder_layers, layer_index

log = logging.getLogger(__name__)

OptimizerBuilder = Callable[[Iterable[dict[str, Any]], OptimConfig], torch.optim.Optimizer]


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's shape in the model, whatever the engine holds locally: ZeRO-3 turns
    parameters into empty 1-D partitions as they are created (zero.Init, used by
    from_pretrained under DeepSpeed) and keeps the original shape in `ds_shape`; FSDP2's
    DTensors report their global shape themselves."""
    ds_shape = getattr(param, "ds_shape", None)
    return tuple(ds_shape if ds_shape is not None else param.shape)


def full_numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter, not of this process's ZeRO-3 partition."""
    ds_numel = getattr(param, "ds_numel", None)
    return int(ds_numel) if ds_numel is not None else param.numel()


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms and other 1-D parameters are not weight-decayed (judged by the
    parameter's full shape, so a ZeRO-3 partition still decays like its matrix)."""
    return len(full_shape(param)) < 2 or name.endswith(".bias") or "norm" in name.lower()


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
    undecayed biases/norms. Groups carry a readable `name` and their parameter count
    `num_params` for the start-up summary: once an engine has prepared the optimizer, its
    groups hold flat per-rank partitions (ZeRO-1/2/3) that no longer tell either.
    """
    parts: dict[str, Any] = {"n_layers": 0, "layers_attr": "layers"}
    if rules is not None:
        parts["head"] = param_ids(head_modules(model))
        parts["embeddings"] = param_ids(input_embedding_modules(model))
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
                "num_params": 0,
                "labels": [],
            },
        )
        if lr is not None:
            group["lr"] = lr
        group["params"].append(param)
        group["num_params"] += full_numel(param)
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


def innermost_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer that really updates the weights, under Accelerate's wrapper and
    DeepSpeed's ZeRO optimizer (which hold it as `.optimizer`)."""
    while getattr(optimizer, "optimizer", None) is not None:
        optimizer = optimizer.optimizer
    return optimizer  # type: ignore[no-any-return]


def group_summaries(optimizer: Any) -> list[dict[str, Any]]:
    """Name, parameter count, configured lr and weight decay of every group.

    The count is the one recorded when the groups were built (engines replace a group's
    parameters by per-rank partitions), the lr the configured peak: a scheduler's
    `initial_lr`, not its current (warmup) value.
    """
    return [
        {
            "name": group.get("name", "?"),
            "params": group.get("num_params", sum(full_numel(p) for p in group["params"])),
            "lr": group.get("initial_lr", group["lr"]),
            "weight_decay": group.get("weight_decay", 0.0),
        }
        for group in innermost_optimizer(optimizer).param_groups
    ]


def optimizer_report(optimizer: Any) -> dict[str, Any]:
    """The optimizer in effect, for the run's summary: class, wrappers, groups."""
    wrappers = []
    while getattr(optimizer, "optimizer", None) is not None:
        wrappers.append(type(optimizer).__name__)
        optimizer = optimizer.optimizer
    report: dict[str, Any] = {
        "class": type(optimizer).__name__,
        "wrapped_by": wrappers,
        "groups": group_summaries(optimizer),
    }
    if getattr(optimizer, "defaults", {}).get("fused"):
        report["fused"] = True
    return report


def describe_groups(optimizer: Any) -> str:
    """One line per parameter group: name, parameters, configured lr, weight decay."""
    report = optimizer_report(optimizer)
    lines = [f"optimizer {report['class']}: {len(report['groups'])} group(s)"]
    for group in report["groups"]:
        lines.append(
            f"  {group['name']:<32} {group['params']:>12,} params  lr {group['lr']:.3g}  "
            f"wd {group['weight_decay']:g}"
        )
    return "\n".join(lines)


def fused_adamw() -> bool:
    """Whether optim adamw uses torch's fused kernel: on a CUDA machine."""
    return torch.cuda.is_available()


def _adamw(groups: Iterable[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """torch's AdamW; on a CUDA machine its fused kernel (one launch for all parameters,
    and an update it can skip on the device, see `bigft.loop.step`). On the CPU torch's
    default implementation stays."""
    fused = fused_adamw() or None
    return torch.optim.AdamW(list(groups), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def _bnb_adamw(paged: bool) -> OptimizerBuilder:
    def build(groups: Iterable[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
        name = "paged_adamw_8bit" if paged else "adamw_8bit"
        require("bitsandbytes", "quant", f"optim {name}")
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
        return cls(list(groups), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)

    return build


def _deepspeed_cpu_adamw(
    groups: Iterable[dict[str, Any]], cfg: OptimConfig
) -> torch.optim.Optimizer:
    """AdamW for ZeRO-Offload, whose step runs on the CPU over fp32 partitions: DeepSpeed's
    vectorized, OpenMP-threaded CPU Adam, several times faster there than torch's. Its C++
    op is compiled on first use (about a minute) and cached in ~/.cache/torch_extensions
    (or $TORCH_EXTENSIONS_DIR)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    try:
        return DeepSpeedCPUAdam(
            list(groups), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, adamw_mode=True
        )
    except RuntimeError as exc:
        raise BigftError(
            f"optim adamw with parallel.offload_optimizer uses DeepSpeed's CPU Adam, whose C++ "
            f"op did not build: {exc.__cause__ or exc}. It needs a C++ compiler (g++) and "
            "write access to ~/.cache/torch_extensions (or set TORCH_EXTENSIONS_DIR)"
        ) from exc


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


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, cpu_offload: bool = False
) -> torch.optim.Optimizer:
    """The configured optimizer over the model's trainable parameters, grouped by lr.

    `cpu_offload`: DeepSpeed ZeRO-Offload runs the step on the CPU (see
    `distributed.offloads_optimizer_step`); adamw is then DeepSpeed's CPU Adam.
    """
    per_part = (cfg.layer_decay, cfg.lr_adapters, cfg.lr_head, cfg.lr_embeddings)
    rules = LrRules.from_config(cfg) if any(v is not None for v in per_part) else None
    builder = OPTIMIZERS[cfg.name]
    if cpu_offload and cfg.name == "adamw":
        builder = _deepspeed_cpu_adamw
    optimizer = builder(param_groups(model, cfg.weight_decay, rules), cfg)
    log.info("%s", describe_groups(optimizer))
    return optimizer


def check_warmup(cfg: ScheduleConfig, total_steps: int) -> None:
    """schedule.warmup_steps must fit in the run. Config validation checks it against
    train.steps; a run of train.epochs learns its length only from the data, so this
    check runs again once it is known."""
    if cfg.warmup_steps is not None and cfg.warmup_steps > total_steps:
        raise ConfigError(
            f"schedule.warmup_steps: {cfg.warmup_steps} warmup steps in a run of "
            f"{total_steps} optimizer steps; lower it, or use schedule.warmup_ratio"
        )


def warmup_steps(cfg: ScheduleConfig, total_steps: int) -> int:
    """Optimizer steps of linear warmup: schedule.warmup_steps, else warmup_ratio of the run."""
    check_warmup(cfg, total_steps)
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return math.ceil(cfg.warmup_ratio * total_steps)


def schedule_factor(step: int, name: str, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of optim.lr for the update of optimizer step `step + 1` (0-based `step`).

    Warmup ramps linearly over the first `warmup` updates without a zero-lr update:
    (step + 1) / (warmup + 1), so update 1 already moves the weights and the schedule
    reaches the full lr right after warmup. Then: constant; linear decay towards 0; or
    cosine decay to `min_ratio`.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if name == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if name == "linear":
        return max(0.0, 1.0 - progress)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup, then linear / cosine (to min_lr_ratio) / constant (`schedule_factor`).

    Raises ConfigError when schedule.warmup_steps is longer than the run (`check_warmup`).
    """
    warmup = warmup_steps(cfg, total_steps)
    factor = functools.partial(
        schedule_factor,
        name=cfg.name,
        warmup=warmup,
        total=total_steps,
        min_ratio=cfg.min_lr_ratio if cfg.name == "cosine" else 0.0,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
