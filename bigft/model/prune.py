"""Magnitude pruning of the linear layers inside a model's repeated blocks.

The layers pruned are the nn.Linear (and GPT-2 Conv1D) modules held in an nn.ModuleList:
the attention and MLP projections of every decoder or encoder layer. Embeddings, the LM
head and classification heads stay whole: they are small next to the blocks and pruning
them costs far more quality. `torch.nn.utils.prune` computes the masks; `prune.remove`
makes them permanent, so the saved weights are ordinary dense tensors holding zeros.

- unstructured: per layer, the `sparsity` fraction of weights of smallest magnitude
  (`l1_unstructured`);
- 2:4: in every group of 4 consecutive input weights the 2 of largest magnitude are kept,
  the layout NVIDIA's sparse tensor cores run; exactly 50 % sparsity.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch.nn.utils import prune

from bigft.errors import BigftError

PATTERNS = ("unstructured", "2:4")


def check_pruning(sparsity: float, pattern: str) -> None:
    """--sparsity / --pattern, checked before anything is loaded."""
    if pattern not in PATTERNS:
        raise BigftError(f"--pattern {pattern}: unknown; use {' or '.join(PATTERNS)}")
    if not 0.0 < sparsity < 1.0:
        raise BigftError(f"--sparsity {sparsity}: give the fraction of weights to zero, e.g. 0.5")
    if pattern == "2:4" and sparsity != 0.5:
        raise BigftError(
            f"--pattern 2:4 zeroes 2 of every 4 weights, a sparsity of exactly 0.5; "
            f"drop --sparsity {sparsity} or use --pattern unstructured"
        )


class TwoOfFour(prune.BasePruningMethod):
    """2:4 semi-structured sparsity: in every group of 4 consecutive input weights of an
    output, the 2 of largest magnitude are kept (the layout sparse tensor cores run)."""

    PRUNING_TYPE = "unstructured"

    def __init__(self, input_dim: int = 1) -> None:
        self.input_dim = input_dim  # nn.Linear stores (out, in); GPT-2's Conv1D (in, out)

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        rows = t.transpose(0, 1) if self.input_dim == 0 else t
        groups = rows.abs().reshape(-1, 4)
        keep = groups.topk(2, dim=1).indices
        mask = torch.zeros_like(groups).scatter_(1, keep, 1.0).reshape(rows.shape)
        return (mask.transpose(0, 1) if self.input_dim == 0 else mask) * default_mask


def prunable_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, int]]:
    """(name, layer, input dim) of the linear layers inside the model's repeated blocks
    (modules held in an nn.ModuleList), never the output embeddings (LM head)."""
    from transformers.pytorch_utils import Conv1D

    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    in_blocks: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList):
            for sub_name, sub in module.named_modules(prefix=name):
                in_blocks.setdefault(id(sub), sub_name)
    layers: list[tuple[str, torch.nn.Module, int]] = []
    for name, module in model.named_modules():
        if id(module) not in in_blocks or module is output:
            continue
        if isinstance(module, torch.nn.Linear):
            layers.append((name, module, 1))
        elif isinstance(module, Conv1D):
            layers.append((name, module, 0))
    return layers


def prune_model(model: torch.nn.Module, sparsity: float, pattern: str) -> dict[str, Any]:
    """Prune `prunable_layers` in place (made permanent) and count the zeros."""
    layers = prunable_layers(model)
    if not layers:
        raise BigftError("prune: this model has no linear layers inside repeated blocks")
    for name, module, input_dim in layers:
        inputs = _weight(module).shape[input_dim]
        if pattern == "2:4" and inputs % 4:
            raise BigftError(
                f"--pattern 2:4: {name} has {inputs} inputs, not a multiple of 4; "
                "use --pattern unstructured"
            )
    with torch.no_grad():
        for _, module, input_dim in layers:
            if pattern == "2:4":
                TwoOfFour.apply(module, "weight", input_dim)
            else:
                prune.l1_unstructured(module, "weight", amount=sparsity)
            prune.remove(module, "weight")
    zeros = sum(int((_weight(m) == 0).sum()) for _, m, _ in layers)
    weights = sum(_weight(m).numel() for _, m, _ in layers)
    params = list({id(p): p for p in model.parameters()}.values())  # tied weights once
    total = sum(p.numel() for p in params)
    total_zeros = sum(int((p == 0).sum()) for p in params)
    return {
        "parameters": total,
        "sparsity": {
            "pattern": pattern,
            "target": sparsity,
            "pruned_layers": len(layers),
            "pruned_layer_weights": weights,
            "pruned_layer_zeros": zeros,
            "pruned_layers_sparsity": zeros / weights,
            "all_weights": total,
            "all_zeros": total_zeros,
            "overall_sparsity": total_zeros / total,
        },
    }


def _weight(module: torch.nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, module.weight)
