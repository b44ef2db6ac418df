"""`train.compile`: each decoder layer compiled with torch.compile, in place.

Layers, not the whole model: every layer of a decoder has the same code and shapes, so
one compiled graph serves them all, the first step compiles once per distinct layer
signature rather than once per model, and the modules stay where the engines expect them
(FSDP2 shards each layer, DeepSpeed ZeRO-3 hooks each module, activation checkpointing
wraps each layer's call). `nn.Module.compile` keeps the module and its hooks; only its
call goes through the compiled graph.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from bigft.model.methods import find_decoder_layers

log = logging.getLogger(__name__)


def compile_layers(model: Any) -> int:
    """Compile every decoder layer of `model` (peft-wrapped or not); returns how many."""
    attr, _ = find_decoder_layers(model)
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == attr:
            for layer in module:
                layer.compile()
                count += 1
            break
    log.info("train.compile: %d decoder layers compiled (the first steps compile them)", count)
    return count


def is_compiled(module: nn.Module) -> bool:
    """Whether a module's calls go through torch.compile (`nn.Module.compile`)."""
    return getattr(module, "_compiled_call_impl", None) is not None
