"""`method.offload_activations`: the inputs that activation checkpointing saves for each
layer's recompute kept in host memory between forward and backward.

Checkpointing already reduces a decoder layer's saved activations to its input, one
B x L x H tensor; at long sequences those inputs, one per layer, are what is left of the
activation memory. `ActivationOffload.hooks` packs each tensor saved inside a
checkpointed call into pinned host memory and unpacks it back to the device when
backward needs it. On CUDA both copies run on a side stream: the forward's device-to-host
copy overlaps the next layers' compute (the tensor is kept alive for the copy with
`record_stream`, not by a wait), and backward waits only for the copy it needs. Without
CUDA the tensor is copied into host memory all the same (no pinning, no stream), which
runs the same pack and unpack code on the CPU.

Small tensors (under `min_bytes`, e.g. position ids) stay where they are: copying them
costs more than they take. Parameters and frozen buffers are never saved by a checkpointed
call (it keeps only its inputs), so nothing here duplicates a weight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch


class ActivationOffload:
    """Saved-tensor hooks that keep checkpointed layer inputs in host memory.

    `host_bytes` / `tensors` count what is in host memory now (packed and not yet
    unpacked by backward); `peak_host_bytes` the most at once.
    """

    def __init__(self, min_bytes: int = 1 << 16) -> None:
        self.min_bytes = min_bytes
        self.host_bytes = self.peak_host_bytes = self.tensors = 0
        self._stream: Any = None

    def _side_stream(self, device: torch.device) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def pack(self, tensor: torch.Tensor) -> Any:
        size = tensor.numel() * tensor.element_size()
        if size < self.min_bytes or tensor.device.type == "meta":
            return tensor
        if tensor.device.type == "cuda":
            stream = self._side_stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(stream):
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host.copy_(tensor, non_blocking=True)
                tensor.record_stream(stream)  # not reused before the copy is done
                done = stream.record_event()
        else:
            host, done = tensor.detach().clone(), None
        self.host_bytes += size
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
        self.tensors += 1
        return _Packed(host, tensor.device, done, size)

    def unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Packed):
            return packed
        self.host_bytes -= packed.size
        self.tensors -= 1
        if packed.device.type != "cuda":
            return packed.host
        stream = self._side_stream(packed.device)
        current = torch.cuda.current_stream(packed.device)
        with torch.cuda.stream(stream):
            stream.wait_event(packed.done)
            tensor = packed.host.to(packed.device, non_blocking=True)
        current.wait_stream(stream)
        tensor.record_stream(current)
        return tensor

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        """Offload what is saved for backward inside this block."""
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield

    def wrap(self, checkpoint_fn: Callable[..., Any]) -> Callable[..., Any]:
        """`checkpoint_fn` (torch's checkpoint with its settings) with its saved inputs
        offloaded: what a model's layers are handed as their checkpointing function."""

        def offloaded(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            with self.hooks():
                return checkpoint_fn(function, *args, **kwargs)

        return offloaded


class _Packed:
    __slots__ = ("device", "done", "host", "size")

    def __init__(self, host: torch.Tensor, device: torch.device, done: Any, size: int) -> None:
        self.host, self.device, self.done, self.size = host, device, done, size


def offload_checkpointed_inputs(model: Any, offload: ActivationOffload) -> int:
    """Route the checkpointing function of every module of `model` that checkpoints
    (transformers' `GradientCheckpointingLayer`s, after `activation_checkpointing_enable`)
    through `offload`; returns how many modules checkpoint now. The model keeps `offload`
    as `_bigft_offload` (its counters are the run's offload figures)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    count = 0
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if not isinstance(module, GradientCheckpointingLayer) or func is None:
            continue
        if not module.gradient_checkpointing:
            continue
        if not getattr(func, "_bigft_offloaded", False):
            wrapped = offload.wrap(func)
            wrapped._bigft_offloaded = True  # type: ignore[attr-defined]
            module._gradient_checkpointing_func = wrapped  # type: ignore[assignment]
        count += 1
    model._bigft_offload = offload
    return count
