"""Tiled MLP: each decoder layer's MLP run over the sequence a tile at a time.

At long sequences the largest tensors of a decoder layer are its MLP intermediates: the
gate and up projections and the activation, three tokens x intermediate_size tensors
(3 x 32k x 14,336 bf16 = 2.6 GiB for one Llama-3.1-8B layer at 32k tokens). The MLP acts
on each token alone, so it can run on slices of the sequence with the same result. As in
ALST (Snowflake's Arctic Long Sequence Training) and Axolotl's TiledMLP, each tile runs
under non-reentrant activation checkpointing: forward keeps only the tile's input and
output, backward recomputes one tile's intermediates at a time.

`apply_tiled_mlp` replaces the forward of each MLP instance (as `bigft.chunked_loss` does
for the lm_head), not the module: the module's `__call__` still runs, so DeepSpeed ZeRO-3
gathers and FSDP2 unshards its weights through their hooks, and peft's LoRA layers inside
the MLP run as they would. The tiles' recomputation happens inside the MLP's backward,
where both engines hold the weights again (their hooks on the module's outputs).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bigft.errors import BigftError, ConfigError


class TiledForward:
    """The tiling forward installed on one MLP instance; `shards=None` picks
    ceil(tokens / hidden_size) tiles per call (tokens = batch x sequence)."""

    def __init__(self, module: nn.Module, shards: int | None) -> None:
        self.module = module
        self.shards = shards
        self._forward = module.forward
        module.forward = self.forward  # type: ignore[method-assign]
        module._bigft_tiled_mlp = self  # type: ignore[assignment]

    def tiles(self, batch: int, length: int, hidden: int) -> int:
        """Tiles for an input of shape (batch, length, hidden): at most one per position."""
        wanted = self.shards or math.ceil(batch * length / hidden)
        return max(1, min(wanted, length))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or x.dim() != 3:
            return self._forward(x, *args, **kwargs)
        n = self.tiles(*x.shape)
        if n == 1:
            return self._forward(x)
        size = math.ceil(x.size(1) / n)
        outputs = []
        # One split (a single backward node that concatenates the tiles' gradients), not
        # n slices, each of whose backward would allocate a zero-filled full-size gradient.
        for tile in x.split(size, dim=1):
            if torch.is_grad_enabled():
                # RNG state kept: LoRA dropout inside the MLP draws the same mask again.
                out = checkpoint(self._forward, tile, use_reentrant=False)
            else:
                out = self._forward(tile)
            if not isinstance(out, torch.Tensor):
                raise BigftError(
                    f"method.tiled_mlp: {type(self.module).__name__} returns "
                    f"{type(out).__name__}, not a tensor; it cannot be tiled (turn tiled_mlp off)"
                )
            outputs.append(out)
        return torch.cat(outputs, dim=1)


def _decoder_mlps(model: nn.Module) -> list[nn.Module]:
    """The dense `mlp` of every layer of the model's stacks of decoder layers (a
    ModuleList whose entries all have an `mlp` submodule); mixture-of-experts blocks,
    which route tokens to experts and return router logits, are left alone."""
    mlps: list[nn.Module] = []
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        found = [getattr(layer, "mlp", None) for layer in module]
        if all(isinstance(m, nn.Module) for m in found):
            mlps.extend(m for m in found if m is not None and not hasattr(m, "experts"))
    return mlps


def apply_tiled_mlp(model: nn.Module, shards: int | None) -> int:
    """Tile the MLP of every decoder layer of `model` (a transformers model, peft-wrapped
    or not) over the sequence: `shards` tiles per call, or None for ceil(tokens /
    hidden_size). Returns the number of MLPs patched; applying it twice re-sets `shards`."""
    if shards is not None and shards < 1:
        raise ConfigError(f"method.tiled_mlp_shards must be >= 1 (got {shards})")
    mlps = _decoder_mlps(model)
    if not mlps:
        raise BigftError(
            f"method.tiled_mlp: {type(model).__name__} has no decoder layers with a dense "
            "`mlp` module (turn tiled_mlp off)"
        )
    for mlp in mlps:
        installed = getattr(mlp, "_bigft_tiled_mlp", None)
        if installed is not None:
            installed.shards = shards
        else:
            TiledForward(mlp, shards)
    return len(mlps)
