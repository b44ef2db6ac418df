"""The parts of a model that freezing and layer-wise learning rates tell apart, on language
and vision models alike: the input embeddings (a token table, a patch embedding or a
convolutional stem) and the head (the LM head, a sequence or image classifier).

transformers names them `get_input_embeddings` / `get_output_embeddings` on language
models; vision models mostly leave the first unimplemented and return no output
embeddings, so the conventional attribute names are read instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bigft.errors import BigftError

log = logging.getLogger(__name__)

# Attributes holding a classification head (sequence and image classification models).
HEAD_NAMES = ("classifier", "score", "cls_classifier")
# Attributes of the base model holding its embeddings / stem.
EMBEDDING_NAMES = ("embeddings", "embedder", "embed_tokens", "patch_embed")


def _outside_stacks(name: str) -> bool:
    """Whether a module name lies outside every ModuleList (no numeric component)."""
    return not any(part.isdigit() for part in name.split("."))


def _within(module: nn.Module, found: Sequence[nn.Module]) -> bool:
    return any(module is f or any(module is m for m in f.modules()) for f in found)


def input_embedding_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that embed the inputs: the token embeddings, and an encoder's whole
    `embeddings` module (positions, token types, their norm) or a vision stem (ResNet's
    embedder, ViT's patch embeddings, both towers' of CLIP)."""
    found: list[nn.Module] = []
    try:
        table = model.get_input_embeddings()  # type: ignore[operator]
        if isinstance(table, nn.Module):
            found.append(table)
    except (NotImplementedError, AttributeError):
        pass
    for name, module in model.named_modules():
        wanted = name.rsplit(".", 1)[-1] in EMBEDDING_NAMES and _outside_stacks(name)
        if wanted and not _within(module, found):
            found.append(module)
    return found


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The output head: the LM head, or a classifier (peft's trained copy included)."""
    found: list[nn.Module] = []
    out = getattr(model, "get_output_embeddings", lambda: None)()
    if isinstance(out, nn.Module):
        found.append(out)
    for name, module in model.named_modules():
        wanted = name.rsplit(".", 1)[-1] in HEAD_NAMES and _outside_stacks(name)
        if wanted and not _within(module, found):
            found.append(module)
    return found


def param_ids(modules: Sequence[nn.Module]) -> set[int]:
    return {id(p) for m in modules for p in m.parameters()}


def replace_head_if_relabelled(model: Any, base: str, names: Sequence[str]) -> bool:
    """Give an image classifier a freshly initialized head when its base was trained for
    other classes: a head of another size is new already (`ignore_mismatched_sizes`), but
    one of the same size would keep scoring the base's classes under the new names.
    True when the head was replaced."""
    from transformers import AutoConfig

    try:
        saved = AutoConfig.from_pretrained(base)
        trained = [str(saved.id2label[i]) for i in sorted(saved.id2label)]
    except (OSError, ValueError, AttributeError):
        trained = []
    if trained == list(names):
        return False
    head = next((getattr(model, n) for n in HEAD_NAMES if hasattr(model, n)), None)
    if not isinstance(head, nn.Module):
        raise BigftError(
            f"{type(model).__name__} has no classification head attribute ({', '.join(HEAD_NAMES)})"
        )
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if sorted(trained) == sorted(names) and linears and linears[-1].out_features == len(names):
        # The same classes in another order (e.g. sorted folder names): reorder the rows.
        order = torch.tensor([trained.index(name) for name in names])
        last = linears[-1]
        with torch.no_grad():
            last.weight.copy_(last.weight[order])
            if last.bias is not None:
                last.bias.copy_(last.bias[order])
        log.info("the head's classes reordered to data.label_names: %s", ", ".join(names))
        return False
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=getattr(model.config, "initializer_range", 0.02))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif callable(getattr(module, "reset_parameters", None)) and module is not head:
                module.reset_parameters()  # type: ignore[operator]
    log.info(
        "a new head for %d classes (%s) in place of the base's %s",
        len(names),
        ", ".join(names[:5]),
        ", ".join(trained[:5]) or "none",
    )
    return True
