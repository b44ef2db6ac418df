"""Instruments for the simulator: a phase-aware MemTracker and an NF4 stand-in.

Both subclass torch / transformers building blocks inside functions, so importing this
module does not import torch.
"""

from __future__ import annotations

from typing import Any

from bigft.plan.workload import NF4_BYTES_PER_PARAM


def phase_tracker() -> Any:
    """A MemTracker that also supports phases and frozen parameters.

    Upstream MemTracker (torch 2.13) registers a gradient hook on every parameter of each
    module it meets, which raises on frozen ones (LoRA bases, frozen layers); it also has
    no public way to restart its running peak. Both touch private state, kept here.
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    class _NoHook:
        def remove(self) -> None:
            return None

    class PhaseTracker(MemTracker):
        def _track_module_params_and_buffers(
            self, module: Any, install_grad_hooks: bool = True
        ) -> tuple[int, int]:
            for p in module.parameters():
                if not p.requires_grad and p not in self._param_to_grad_hook_handles:
                    self._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def reset_peak(self) -> None:
            """Start a new phase: the running peak becomes the current memory."""
            self._peak_mem_snap = self.get_tracker_snapshot("current")
            self._peak_mem = {d: s["Total"] for d, s in self._peak_mem_snap.items()}

    return PhaseTracker()


def nf4_linear_class() -> Any:
    """A stand-in for bitsandbytes' Linear4bit with its storage and memory behaviour
    (bitsandbytes' 4-bit kernels need CUDA and real data; fake tensors have neither)."""
    import torch
    from torch import nn

    class Dequant(torch.autograd.Function):
        """bitsandbytes MatMul4Bit's memory behaviour: keep only the packed weight and
        dequantize it again in backward, so no bf16 weight copy outlives the matmul."""

        @staticmethod
        def forward(ctx: Any, x: Any, packed: Any, shape: tuple[int, int]) -> Any:
            ctx.save_for_backward(packed)
            ctx.shape = shape
            w = torch.empty(shape, dtype=x.dtype, device=x.device)
            return x @ w.t()

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            w = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device)
            return grad @ w, None, None

    class NF4Linear(nn.Linear):
        """A frozen linear whose weight is stored as NF4 + double-quantized absmax."""

        def __init__(self, base: nn.Linear) -> None:
            nn.Module.__init__(self)
            self.in_features, self.out_features = base.in_features, base.out_features
            n = base.in_features * base.out_features
            self.weight = nn.Parameter(
                torch.empty(n // 2, 1, dtype=torch.uint8), requires_grad=False
            )
            extra = round(n * (NF4_BYTES_PER_PARAM - 0.5))
            self.register_buffer("quant_state", torch.empty(extra, dtype=torch.uint8))
            self.bias = base.bias

        def forward(self, x: Any) -> Any:
            # Linear4bit: compute in bf16, hand back the input's dtype.
            dtype = x.dtype
            out = Dequant.apply(
                x.to(torch.bfloat16), self.weight, (self.out_features, self.in_features)
            )
            out = out if self.bias is None else out + self.bias.to(out.dtype)
            return out.to(dtype)

    return NF4Linear
