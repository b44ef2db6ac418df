"""The memory planner: per-GPU memory of a training step, before any GPU time is spent.

Two estimators share one input (`Workload`): `analytic` (instant, tensor-by-tensor
accounting) and `simulate` (one real step under FakeTensorMode, measured by torch's
MemTracker). `make_plan` adds the micro-batch, accumulation and layout ranking on a GPU;
`choose_micro_batch` is what `train.micro_batch_size: auto` calls. Importing this package
does not import torch.
"""

from bigft.plan.arch import ArchSpec, load_arch, shipped_archs
from bigft.plan.hardware import CATALOGUE, GPU, custom_gpu, get_gpu
from bigft.plan.memory import Breakdown, analytic, model_states, zero_model_states
from bigft.plan.planner import (
    PlanReport,
    choose_micro_batch,
    make_plan,
    plan_for_run,
    workload_from_config,
)
from bigft.plan.simulate import SimResult, simulate
from bigft.plan.workload import Workload

__all__ = [
    "CATALOGUE",
    "GPU",
    "ArchSpec",
    "Breakdown",
    "PlanReport",
    "SimResult",
    "Workload",
    "analytic",
    "choose_micro_batch",
    "custom_gpu",
    "get_gpu",
    "load_arch",
    "make_plan",
    "model_states",
    "plan_for_run",
    "shipped_archs",
    "simulate",
    "workload_from_config",
    "zero_model_states",
]
