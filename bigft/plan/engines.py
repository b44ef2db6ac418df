"""How a layout's plan differs from DDP's on the same GPUs, term by term.

On one GPU nothing is partitioned: ZeRO-1/2/3 and FSDP2 would hold what DDP holds but for
what their engines do differently, and each such difference has a name here:

- DeepSpeed's bf16 engine casts the whole module to bf16 (an explicit model.dtype
  float32 included) and keeps fp32 master weights of what trains in its optimizer, with
  double-buffered reduce buckets; the bf16 module runs without autocast, so activations
  follow bf16 instead of autocast's dtypes. ZeRO-3 also holds the layer it gathered.
- FSDP2 keeps fp32 shards of what trains and fp32 gradients, and holds the unsharded bf16
  layer in flight (and the root group: embeddings, head) on top.
- zero3-offload keeps states in host memory.

`differences_from_ddp` measures each component against DDP's plan at the same
micro-batch and names it; `bigft plan` prints them for one-GPU layouts.
"""

from __future__ import annotations

from bigft.plan.memory import Breakdown, analytic
from bigft.plan.workload import Workload

GIB = 1024**3
MIN_TERM = 0.005 * GIB  # differences smaller than this are not listed

_DEEPSPEED = {
    "params": "weights: DeepSpeed casts the module to bf16 (fp32 masters are optimizer state)",
    "grads": "gradients: bf16 in the module (DDP's follow the fp32 weights)",
    "optimizer": "optimizer: DeepSpeed's fp32 master weights and fp32 gradient partition",
    "activations": "activations: the bf16 module runs without autocast",
    "buffers": "buffers: DeepSpeed's reduce buckets",
}
REASONS: dict[str, dict[str, str]] = {
    "zero1": _DEEPSPEED,
    "zero2": _DEEPSPEED,
    "zero3": {
        **_DEEPSPEED,
        "buffers": "buffers: reduce buckets and the gathered (unsharded) layer",
    },
    "zero3-offload": {
        **_DEEPSPEED,
        "params": "weights: in host memory (offloaded)",
        "grads": "gradients: in host memory (offloaded)",
        "optimizer": "optimizer: in host memory (offloaded)",
        "buffers": "buffers: reduce buckets and the gathered (unsharded) layer",
    },
    "fsdp2": {
        "params": "weights: FSDP2's fp32 shards of what trains",
        "grads": "gradients: fp32, reduced in fp32",
        "optimizer": "optimizer: states of the fp32 shards",
        "activations": "activations: computed on FSDP2's bf16 unsharded weights",
        "buffers": "buffers: the unsharded bf16 layer in flight and the root group",
    },
}


def _component(b: Breakdown, name: str) -> float:
    if name == "activations":
        return b.activations + b.logits
    return float(getattr(b, name))


def differences_from_ddp(work: Workload) -> list[tuple[str, float]]:
    """(named reason, bytes) for each component of the layout's peak that differs from
    DDP's at the same micro-batch and GPUs by MIN_TERM or more (negative: less). On one
    GPU their sum is the whole difference in tensor memory; with more GPUs sharding
    is part of it."""
    if work.strategy == "ddp":
        return []
    mine, ddp = analytic(work), analytic(work.with_(strategy="ddp"))
    terms = []
    for name, reason in REASONS[work.strategy].items():
        delta = _component(mine, name) - _component(ddp, name)
        if abs(delta) >= MIN_TERM:
            terms.append((reason, delta))
    return terms


def single_gpu_note(work: Workload) -> str | None:
    """The plan's note for a sharding layout on one GPU: it partitions nothing, and how its
    per-GPU memory differs from DDP's, by named term."""
    if work.strategy == "ddp" or work.world_size > 1:
        return None
    terms = differences_from_ddp(work)
    total = sum(delta for _, delta in terms)
    detail = "; ".join(f"{reason} {delta / GIB:+.2f}" for reason, delta in terms)
    return f"{work.strategy} on one GPU partitions nothing: {total / GIB:+.2f} GiB against ddp" + (
        f" ({detail})" if detail else ""
    )
