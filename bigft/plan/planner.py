"""The plan: breakdown at the chosen micro-batch, batch layout, ranked layouts, advice.

`make_plan` is what `bigft plan` prints and what `train.micro_batch_size: auto` uses;
`workload_from_config` (bigft.plan.from_config) turns a bigft Config into its Workload.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bigft.errors import ConfigError
from bigft.plan.batch import (
    DEFAULT_CPU_MEM_GIB,
    LayoutOption,
    host_shortfall,
    max_micro_batch,
    overhead_bytes,
    pick_micro_batch,
    rank_layouts,
    usable_bytes,
)
from bigft.plan.engines import single_gpu_note
from bigft.plan.from_config import planned_gpu, sequences_per_row, workload_from_config
from bigft.plan.hardware import GIB, GPU
from bigft.plan.memory import Breakdown, analytic
from bigft.plan.workload import UNSUPPORTED, Workload

# Least to most sharding: the "nearest" layout to suggest is the next one that fits.
ESCALATION = ("ddp", "zero1", "zero2", "fsdp2", "zero3", "zero3-offload")


@dataclass
class PlanReport:
    """Everything `bigft plan` reports for one workload on one GPU model."""

    work: Workload
    gpu: GPU
    margin: float
    breakdown: Breakdown
    overhead: float
    fits: bool
    micro_batch: int
    micro_batch_given: bool
    max_micro_batch: int
    grad_accum: int
    global_batch: int | None
    layouts: list[LayoutOption]
    simulated: Any = None  # SimResult when --simulate
    notes: list[str] = field(default_factory=list)
    message: str | None = None
    cpu_mem_gib: float = DEFAULT_CPU_MEM_GIB
    gpu_source: str = ""  # where the GPU model came from: a flag, the config, a default

    @property
    def total(self) -> float:
        return self.breakdown.tensor_peak + self.overhead

    @property
    def usable(self) -> float:
        return usable_bytes(self.gpu, self.margin)

    def summary(self) -> str:
        """One line for the training log: the planner's inputs and its choice."""
        w = self.work
        verdict = "fits" if self.fits else "does NOT fit"
        return (
            f"planner: {w.arch.name} {w.method} {w.strategy} x{w.world_size} on {self.gpu.name} "
            f"({self.gpu.memory_gib:.1f} GiB), seq {w.seq_len}, grad ckpt "
            f"{'on' if w.grad_ckpt else 'off'}: micro-batch {self.micro_batch} x accum "
            f"{self.grad_accum}, predicted peak {_gib(self.total)} of {_gib(self.usable)} "
            f"usable ({verdict})"
        )


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def nearest_fitting(layouts: list[LayoutOption], asked: str) -> LayoutOption | None:
    """The first layout that fits, going from `asked` towards more sharding; else the
    fastest layout that fits."""
    fitting = {o.name: o for o in layouts if o.fits}
    start = ESCALATION.index(asked) if asked in ESCALATION else 0
    for name in ESCALATION[start:]:
        if name in fitting:
            return fitting[name]
    return next((o for o in layouts if o.fits), None)


def _more_gpus(work: Workload, gpu: GPU, margin: float, cpu_mem_gib: float) -> str:
    """Advice when no layout fits: checkpointing, more nodes for ZeRO-3, or QLoRA."""
    capacity = usable_bytes(gpu, margin)

    def fits(**changes: Any) -> bool:
        candidate = work.with_(micro_batch=1, **changes)
        if host_shortfall(candidate, cpu_mem_gib):
            return False
        return max_micro_batch(candidate, capacity) > 0

    if not work.grad_ckpt:
        for layout in ESCALATION:
            if (work.method, layout) not in UNSUPPORTED and fits(strategy=layout, grad_ckpt=True):
                return f"with --grad-ckpt, {layout} fits"
    for factor in (2, 4, 8, 16, 32, 64, 128):
        nodes = work.nodes * factor
        if fits(strategy="zero3", grad_ckpt=True, nodes=nodes):
            return f"zero3 with --grad-ckpt fits on {nodes} nodes x {work.gpus_per_node} GPUs"
    if work.method != "qlora" and fits(method="qlora", strategy="ddp", grad_ckpt=True):
        return "--method qlora --grad-ckpt fits"
    return "use a shorter --seq-len or a larger GPU"


def make_plan(
    work: Workload,
    gpu: GPU,
    margin: float = 0.05,
    global_batch: int | None = None,
    micro_given: bool = False,
    grad_accum: int | None = None,
    cpu_mem_gib: float = DEFAULT_CPU_MEM_GIB,
) -> PlanReport:
    """Plan `work` on `gpu`: the breakdown at the given (or chosen) micro-batch, the
    accumulation for the global batch, and every layout ranked."""
    if not 0 <= margin < 1:
        raise ConfigError(f"--margin must be in [0, 1) (got {margin:g})")
    layouts = rank_layouts(work, gpu, margin, global_batch, cpu_mem_gib)
    if (work.method, work.strategy) in UNSUPPORTED:
        near = nearest_fitting(layouts, work.strategy)
        hint = f"; nearest layout that fits: {near.name}" if near else ""
        raise ConfigError(
            f"{work.method} with {work.strategy} is not supported: "
            f"{UNSUPPORTED[(work.method, work.strategy)]}{hint}"
        )
    capacity = usable_bytes(gpu, margin)
    largest = max_micro_batch(work, capacity)
    world = work.world_size
    if micro_given:
        micro = work.micro_batch
        if global_batch is not None:
            accum = max(-(-global_batch // (micro * world)), 1)
        else:
            accum = grad_accum or 1
    else:
        micro, accum = pick_micro_batch(largest, world, global_batch)
        if micro == 0:
            micro, accum = 1, max((global_batch or world) // world, 1)
    at = work.with_(micro_batch=micro)
    breakdown = analytic(at)
    overhead = overhead_bytes(breakdown.tensor_peak, world)
    report = PlanReport(
        work=at,
        gpu=gpu,
        margin=margin,
        breakdown=breakdown,
        overhead=overhead,
        fits=breakdown.tensor_peak + overhead <= capacity and not host_shortfall(at, cpu_mem_gib),
        micro_batch=micro,
        micro_batch_given=micro_given,
        max_micro_batch=largest,
        grad_accum=accum,
        global_batch=global_batch,
        layouts=layouts,
        notes=_notes(at, gpu, global_batch, micro, accum),
        cpu_mem_gib=cpu_mem_gib,
    )
    if not report.fits:
        report.message = _not_fitting_message(report)
    return report


def _not_fitting_message(report: PlanReport) -> str:
    w = report.work
    need = f"{w.strategy} needs {_gib(report.total)} per GPU of {_gib(report.usable)} usable"
    where = f"{w.world_size} x {report.gpu.name}"
    near = nearest_fitting(report.layouts, w.strategy)
    if near is not None and near.name != w.strategy:
        return (
            f"does not fit: {need} on {where}; nearest layout that fits: {near.name} "
            f"(micro-batch {near.micro_batch}, {_gib(near.total_bytes)})"
        )
    if near is not None:
        return (
            f"does not fit at micro-batch {w.micro_batch}: {need}; largest that fits: "
            f"{report.max_micro_batch}"
        )
    possible = [o for o in report.layouts if not o.reason] or report.layouts
    smallest = min(possible, key=lambda o: o.total_bytes)
    return (
        f"{w.arch.name} ({w.method}) fits no layout on {where}: the smallest, "
        f"{smallest.name}, needs {_gib(smallest.total_bytes)} per GPU of "
        f"{_gib(report.usable)} usable; "
        + _more_gpus(w, report.gpu, report.margin, report.cpu_mem_gib)
    )


def _notes(work: Workload, gpu: GPU, global_batch: int | None, micro: int, accum: int) -> list[str]:
    notes = []
    a = work.arch
    if work.seq_len > a.max_positions:
        notes.append(f"seq_len {work.seq_len} exceeds the model's {a.max_positions} positions")
    if global_batch is not None and micro * accum * work.world_size != global_batch:
        notes.append(
            f"global batch {global_batch} is not a multiple of micro-batch {micro} x "
            f"{work.world_size} GPU(s); accumulation rounded up to {accum}"
        )
    if work.method == "qlora" and work.zero_stage == 3:
        notes.append("qlora with sharded weights needs bnb_4bit_quant_storage=bfloat16")
    if work.strategy == "zero3-offload":
        cpu = analytic(work).cpu_bytes * work.gpus_per_node
        notes.append(f"zero3-offload keeps {_gib(cpu)} per node in CPU memory")
    single = single_gpu_note(work)
    if single:
        notes.append(single)
    if work.loss_path == "full" and work.logit_transform:
        notes.append(f"the model sets {work.logit_transform}: the loss holds the full logits")
    return notes


def detect_gpu(gpu_mem_bytes: int | None = None) -> GPU | None:
    """The GPU to plan for at train time: `gpu_mem_bytes` if given, else CUDA device 0
    (matched against the catalogue for its throughput), else $BIGFT_PLAN_GPU_MEM_GIB."""
    import os

    from bigft.plan.hardware import custom_gpu, get_gpu

    if gpu_mem_bytes is not None:
        return custom_gpu(gpu_mem_bytes / GIB)
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            try:
                known = get_gpu(props.name)
                return GPU(props.name, props.total_memory / GIB, known.bf16_tflops, known.link_gbps)
            except ConfigError:
                return custom_gpu(props.total_memory / GIB)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    env = os.environ.get("BIGFT_PLAN_GPU_MEM_GIB")
    return custom_gpu(float(env)) if env else None


def choose_micro_batch(
    cfg: Any, world_size: int, gpu_mem_bytes: int | None = None
) -> tuple[int, PlanReport]:
    """The micro-batch for `train.micro_batch_size: auto`, and the plan behind it.

    The largest micro-batch whose step fits the GPU with the default margin and divides
    the configured global batch. The GPU is `gpu_mem_bytes`, else the CUDA device this
    process sees, else $BIGFT_PLAN_GPU_MEM_GIB, else the config's hardware.gpu. With none
    of them it returns 1 and the report's `message` says why.
    """
    work = workload_from_config(cfg, gpus_per_node=world_size, nodes=1)
    per_row = sequences_per_row(cfg)  # the plan counts sequences, the config rows
    global_batch = getattr(cfg.train, "global_batch_size", None)
    gpu = detect_gpu(gpu_mem_bytes)
    source = "gpu_mem_bytes" if gpu_mem_bytes is not None else "the GPU this process sees"
    if gpu is None:
        gpu = planned_gpu(cfg)
        source = "from hardware.gpu in the config; no CUDA device here"
    if gpu is None:
        report = make_plan(
            work.with_(micro_batch=1),
            GPU("no GPU", 0.0, 1.0, 1.0),
            global_batch=global_batch,
            micro_given=True,
            grad_accum=getattr(cfg.train, "grad_accum", None),
        )
        report.message = (
            "no CUDA device to plan for: micro-batch 1 (set hardware.gpu, "
            "BIGFT_PLAN_GPU_MEM_GIB or pass gpu_mem_bytes)"
        )
        return 1, report
    report = make_plan(
        work,
        gpu,
        global_batch=None if global_batch is None else global_batch * per_row,
        grad_accum=getattr(cfg.train, "grad_accum", None),
    )
    report.gpu_source = source
    if report.message is None:
        report.message = f"largest micro-batch that fits {gpu.name} ({source})"
    if per_row == 1:
        return max(report.micro_batch, 1), report
    rows, _ = pick_micro_batch(report.max_micro_batch // per_row, world_size, global_batch)
    return max(rows, 1), report


def plan_for_run(cfg: Any, world_size: int, grad_accum: int) -> PlanReport:
    """The plan of a run as configured: its own micro-batch and accumulation, on the GPU
    this process sees (or with no capacity when there is none)."""
    work = workload_from_config(cfg, gpus_per_node=world_size, nodes=1)
    gpu = detect_gpu(None) or GPU("no GPU", 0.0, 1.0, 1.0)
    return make_plan(work, gpu, micro_given=True, grad_accum=grad_accum)
