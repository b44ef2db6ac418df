"""Build the Accelerator that runs the loop, and the batch layout over its processes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin

from bigft.config import TrainConfig
from bigft.errors import ConfigError


def resolve_precision(precision: str) -> str:
    """Accelerate's mixed_precision value ('no' | 'bf16' | 'fp16') for train.precision."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def build_accelerator(train: TrainConfig, grad_accum: int) -> Accelerator:
    """One Accelerator for every launch path (python, accelerate launch, torchrun).

    Without CUDA the Accelerator must be told it runs on CPU: under torchrun a plain
    Accelerator() on CPU silently makes every process rank 0 of a world of 1.
    """
    cpu = not torch.cuda.is_available()
    if cpu:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    return Accelerator(
        cpu=cpu,
        mixed_precision=resolve_precision(train.precision),
        # bigft calls accumulate() exactly grad_accum times per optimizer step and owns
        # the data position, so the end of a dataloader never forces a sync.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=grad_accum, sync_with_dataloader=False
        ),
        step_scheduler_with_optimizer=False,
    )


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's rows are spread: micro-batch x accumulation x processes."""

    micro_batch_size: int
    grad_accum: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size


def batch_layout(train: TrainConfig, world_size: int) -> BatchLayout:
    """Derive gradient accumulation from global_batch_size (or take it as given)."""
    if train.micro_batch_size == "auto":
        raise ConfigError(
            "train.micro_batch_size: 'auto' needs the memory planner, which is not available "
            "in this version; set an integer (e.g. train.micro_batch_size=4)"
        )
    micro = train.micro_batch_size
    if train.global_batch_size is None:
        return BatchLayout(micro, train.grad_accum or 1, world_size)
    per_step = micro * world_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size {train.global_batch_size} is not a multiple of "
            f"micro_batch_size {micro} x {world_size} process(es) = {per_step}"
        )
    return BatchLayout(micro, train.global_batch_size // per_step, world_size)
