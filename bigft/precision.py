"""train.precision resolved for this machine: the one rule the engine setup, the model's
dtypes and the loop's finiteness checks share."""

from __future__ import annotations

import torch


def resolve_precision(precision: str) -> str:
    """Accelerate's mixed_precision value ('no' | 'bf16' | 'fp16') for train.precision."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
