"""What every engine shares, resolved for this machine: train.precision (the one rule the
engine setup, the model's dtypes and the loop's finiteness checks share) and how a global
batch is laid out (world size, micro-batch per process, accumulation)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from bigft.config import TrainConfig
from bigft.errors import ConfigError


def world_size_from_env() -> int:
    """Processes in the job, as set by torchrun / accelerate launch / srun (1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's rows are spread: micro-batch x accumulation x processes."""

    micro_batch_size: int
    grad_accum: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size


def batch_layout(
    train: TrainConfig, world_size: int, micro_batch_size: int | None = None
) -> BatchLayout:
    """Derive gradient accumulation from global_batch_size (or take it as given)."""
    micro = micro_batch_size or train.micro_batch_size
    if micro == "auto":
        raise ConfigError(
            "train.micro_batch_size: 'auto' needs a GPU to plan for; set an integer "
            "(e.g. train.micro_batch_size=4) or see `bigft plan`"
        )
    assert isinstance(micro, int)
    if train.global_batch_size is None:
        return BatchLayout(micro, train.grad_accum or 1, world_size)
    per_step = micro * world_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size {train.global_batch_size} is not a multiple of "
            f"micro_batch_size {micro} x {world_size} process(es) = {per_step}"
        )
    accum = train.global_batch_size // per_step
    if train.grad_accum is not None and train.grad_accum != accum:
        raise ConfigError(
            f"train.grad_accum {train.grad_accum} contradicts train.global_batch_size "
            f"{train.global_batch_size}, which needs grad_accum {accum} with micro_batch_size "
            f"{micro} x {world_size} process(es); set only one of the two"
        )
    return BatchLayout(micro, accum, world_size)


def resolve_precision(precision: str) -> str:
    """Accelerate's mixed_precision value ('no' | 'bf16' | 'fp16') for train.precision."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def global_rank() -> int:
    """This process's rank in the job (0 when not distributed)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def apply_tf32(enabled: bool) -> bool:
    """train.tf32: TF32 matmuls and convolutions for the fp32 work of a run on an Ampere or
    newer GPU (compute capability 8.0+), where they run on tensor cores at ~8x the fp32
    rate with a 10-bit mantissa; bf16 / fp16 matmuls are unaffected. Returns whether TF32
    is now on. Without CUDA nothing changes: on a CPU, torch's "high" float32 precision
    may let oneDNN compute fp32 matmuls in bf16."""
    if not enabled or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability()[0] < 8:
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return True
