"""Micro-batch, gradient accumulation, and the ranking of layouts that fit.

A layout fits when its predicted per-GPU total (tensor peak + CUDA context + allocator
slack) stays under the card's memory minus a stated margin. Step time is a relative
estimate (`step_seconds`): model FLOPs at a fixed fraction of the card's dense bf16 peak,
plus the part of the layout's communication (collectives, zero3-offload's PCIe traffic)
that cannot hide behind compute, plus offload's optimizer step on the CPU. On one GPU
there are no collectives: the layouts that keep everything on the GPU tie.
"""

from __future__ import annotations

from dataclasses import dataclass

from bigft.plan.hardware import GIB, GPU, collective_gbps
from bigft.plan.memory import analytic
from bigft.plan.workload import STRATEGIES, UNSUPPORTED, Workload

CUDA_CONTEXT = 0.75 * GIB  # CUDA context, cuBLAS/cuDNN workspaces (not in memory_allocated)
NCCL_BUFFERS = 0.5 * GIB  # communicator buffers once there is more than one process
FRAGMENTATION = 0.05  # caching-allocator slack over the tensor peak
MFU = 0.40  # fraction of dense bf16 peak a fine-tuning step sustains
OVERLAP = 0.6  # largest share of a step's communication that hides behind its compute
PCIE_GBPS = 25.0  # host <-> GPU per GPU (PCIe 4.0 x16 in practice), for zero3-offload
# DeepSpeed's vectorised CPU Adam (zero3-offload), parameters updated per second per node:
# an assumed order of magnitude for a two-socket host, not a measurement.
CPU_ADAM_PARAMS_PER_S = 1e9
MAX_MICRO_BATCH = 4096
DEFAULT_CPU_MEM_GIB = 512.0  # host memory per node assumed for CPU offload


def overhead_bytes(tensor_peak: float, world_size: int) -> float:
    """Memory the card loses beyond the tensors: context, NCCL, allocator fragmentation."""
    return CUDA_CONTEXT + (NCCL_BUFFERS if world_size > 1 else 0.0) + FRAGMENTATION * tensor_peak


def total_bytes(work: Workload) -> float:
    """Predicted per-GPU memory of the workload, overhead included."""
    peak = analytic(work).tensor_peak
    return peak + overhead_bytes(peak, work.world_size)


def usable_bytes(gpu: GPU, margin: float) -> float:
    """The card's memory less the safety margin (a fraction of it)."""
    return gpu.memory_bytes * (1.0 - margin)


def max_micro_batch(work: Workload, capacity: float) -> int:
    """Largest micro-batch whose step fits in `capacity` bytes (0 if even 1 does not).

    Memory grows monotonically with the micro-batch, so a doubling search then a
    bisection needs ~2 log2(B) analytic evaluations.
    """
    if total_bytes(work.with_(micro_batch=1)) > capacity:
        return 0
    lo, hi = 1, 2
    while hi <= MAX_MICRO_BATCH and total_bytes(work.with_(micro_batch=hi)) <= capacity:
        lo, hi = hi, hi * 2
    hi = min(hi, MAX_MICRO_BATCH + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if total_bytes(work.with_(micro_batch=mid)) <= capacity:
            lo = mid
        else:
            hi = mid
    return lo


def pick_micro_batch(largest: int, world: int, global_batch: int | None) -> tuple[int, int]:
    """(micro-batch, accumulation) for a global batch: the largest micro-batch that fits
    and divides global_batch / world; accumulation 1 without a global batch."""
    if largest < 1:
        return 0, 0
    if global_batch is None:
        return largest, 1
    for micro in range(min(largest, max(global_batch // world, 1)), 0, -1):
        if global_batch % (micro * world) == 0:
            return micro, global_batch // (micro * world)
    return 1, max(global_batch // world, 1)


def compute_seconds(work: Workload, gpu: GPU, grad_accum: int) -> float:
    """Seconds of matmuls in one optimizer step at MFU of the card's dense bf16 peak."""
    a = work.arch
    tokens = work.micro_batch * work.seq_len
    # 2 FLOPs per weight per token forward; backward doubles that for activations'
    # gradients and again for weights' gradients (not needed by frozen bases).
    per_token = 2.0 * a.n_params * (2 if work.adapters else 3)
    per_token += 6.0 * a.layers * a.q_dim * work.seq_len  # attention scores, fwd + bwd
    if work.grad_ckpt:
        per_token += 2.0 * a.n_params  # the recomputed forward
    if work.method == "qlora":
        per_token *= 1.25  # NF4 dequantization before each matmul
    return grad_accum * tokens * per_token / (gpu.bf16_tflops * 1e12 * MFU)


def step_seconds(work: Workload, gpu: GPU, grad_accum: int) -> float:
    """Estimated seconds of one optimizer step: compute, the communication compute does
    not hide, and CPU offload's optimizer step.

    Communication is the layout's collectives (`communication_bytes`) at the collective
    bandwidth, plus, for zero3-offload, its PCIe traffic (`pcie_bytes`). At most OVERLAP
    of it hides behind compute, and no more than the compute lasts: the rest (the first
    gather of a pass, the last bucket's reduction, the all-gather after the step) is on
    the critical path. Offload's optimizer step runs on the CPU after backward, at
    CPU_ADAM_PARAMS_PER_S per node, and hides behind nothing. So at one micro-batch more
    bytes are never faster: zero3 (which gathers the weights every pass) is slower than
    zero2, and offload slower than the same layout on the GPU.
    """
    compute = compute_seconds(work, gpu, grad_accum)
    comm = communication_bytes(work, grad_accum) / (collective_gbps(gpu, work.nodes) * 1e9)
    comm += pcie_bytes(work, grad_accum) / (PCIE_GBPS * 1e9)
    exposed = comm - min(OVERLAP * comm, compute)
    cpu_step = 0.0
    if work.strategy == "zero3-offload":
        cpu_step = work.trainable_params / work.nodes / CPU_ADAM_PARAMS_PER_S
    return compute + exposed + cpu_step


def pcie_bytes(work: Workload, grad_accum: int) -> float:
    """Bytes one GPU moves over PCIe per step under zero3-offload: its share of the bf16
    weights up for forward and for backward, and its share of the gradients down, every
    micro-batch (0 for layouts that keep everything on the GPU)."""
    if work.strategy != "zero3-offload":
        return 0.0
    n = work.world_size
    weights = 2.0 * work.arch.n_params / n
    grads = 2.0 * work.trainable_params / n
    return (2 * weights + grads) * grad_accum


def communication_bytes(work: Workload, grad_accum: int) -> float:
    """Bytes one GPU sends per optimizer step (ring collectives: (N-1)/N of the data per
    reduce-scatter or all-gather, twice that per all-reduce); 0 on one GPU."""
    n = work.world_size
    if n == 1:
        return 0.0
    ring = (n - 1) / n
    grads = float(work.trainable_params) * 2.0
    weights = float(work.arch.n_params) * (0.55 if work.method == "qlora" else 2.0)
    if work.strategy == "ddp":
        return 2 * ring * grads * 2  # all-reduce of fp32 gradients, once per step
    if work.strategy == "zero1":
        return 2 * ring * grads  # reduce-scatter + all-gather of the updated weights
    if work.strategy == "zero2":
        return ring * grads * grad_accum + ring * grads
    # ZeRO-3 / FSDP2: gather weights for forward and backward, reduce-scatter gradients,
    # every micro-batch.
    return ring * (2 * weights + grads) * grad_accum


@dataclass
class LayoutOption:
    """One layout's verdict: whether it fits, with which batch, and how fast."""

    name: str
    fits: bool
    micro_batch: int
    grad_accum: int
    total_bytes: float
    step_seconds: float = float("inf")
    relative: float = float("inf")
    reason: str = ""


def host_shortfall(work: Workload, cpu_mem_gib: float) -> str:
    """Why host memory cannot hold what the workload offloads ('' if it can): ZeRO's
    states and offloaded activations."""
    if work.strategy != "zero3-offload" and not work.offload_activations:
        return ""
    per_node = analytic(work).cpu_bytes * work.gpus_per_node
    if per_node <= cpu_mem_gib * GIB:
        return ""
    return (
        f"offload needs {per_node / GIB:.0f} GiB of CPU memory per node (--cpu-mem {cpu_mem_gib:g})"
    )


def rank_layouts(
    work: Workload,
    gpu: GPU,
    margin: float,
    global_batch: int | None,
    cpu_mem_gib: float = DEFAULT_CPU_MEM_GIB,
) -> list[LayoutOption]:
    """Every layout for the workload's method, fitting ones first, fastest first."""
    capacity = usable_bytes(gpu, margin)
    options = []
    for name in STRATEGIES:
        candidate = work.with_(strategy=name)
        reason = UNSUPPORTED.get((work.method, name)) or host_shortfall(candidate, cpu_mem_gib)
        if reason:
            total = total_bytes(candidate)
            options.append(LayoutOption(name, False, 0, 0, total, reason=reason))
            continue
        largest = max_micro_batch(candidate, capacity)
        micro, accum = pick_micro_batch(largest, work.world_size, global_batch)
        at = candidate.with_(micro_batch=max(micro, 1))
        option = LayoutOption(name, largest > 0, micro, accum, total_bytes(at))
        if option.fits:
            option.step_seconds = step_seconds(at, gpu, accum)
        options.append(option)

    # Layouts may run different batches: compare time per token, not per step.
    def per_token(o: LayoutOption) -> float:
        rows = o.micro_batch * o.grad_accum * work.world_size
        return o.step_seconds / max(rows * work.seq_len, 1) if o.fits else float("inf")

    fastest = min((per_token(o) for o in options), default=float("inf"))
    for option in options:
        if option.fits:
            option.relative = per_token(option) / fastest
    # Ties (communication hidden behind compute) go to the layout with less sharding.
    order = {name: i for i, name in enumerate(("ddp", "zero1", "zero2", "fsdp2", "zero3"))}
    return sorted(options, key=lambda o: (not o.fits, round(o.relative, 2), order.get(o.name, 9)))
