"""Build the Accelerator (DDP, DeepSpeed ZeRO-1/2/3, FSDP2) and the batch layout.

The only module that configures DeepSpeed. Several engines fall back silently on CPU
(see `_cpu_process_group`); `engine_report()` reads back what is really in effect so
runs and tests can prove it.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs

from bigft.config import ParallelConfig, TrainConfig
from bigft.engine.settings import BatchLayout, resolve_precision
from bigft.engine.sharding import (
    deepspeed_config,
    fsdp_plugin,
    offload_threads,
    offloads_optimizer_step,
)
from bigft.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console, RenderableType


def adopt_launcher_strategy(parallel: ParallelConfig) -> None:
    """`accelerate launch --config_file launch/accelerate/zero3.yaml` picks the engine
    through environment variables. A config that leaves parallel.strategy unset follows
    the launcher; one that sets a different strategy is an error, not a silent choice."""
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        launched = f"zero{env.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2')}"
    elif env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        launched = "fsdp2"
    else:
        return
    if "strategy" in parallel.model_fields_set and parallel.strategy != launched:
        raise ConfigError(
            f"parallel.strategy is {parallel.strategy} but the accelerate config launched "
            f"{launched}; make them agree (or drop parallel.strategy to follow the launcher)"
        )
    parallel.strategy = launched  # type: ignore[assignment]
    if env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") == "cpu":
        parallel.offload_optimizer = True
    if env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none") == "cpu":
        parallel.offload_params = True
    # bigft generates the whole engine config from its own YAML; accelerate refuses to
    # build it while the launcher's per-key variables are also set.
    for key in list(env):
        owned = (
            "ACCELERATE_MIXED_PRECISION",
            "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
            "ACCELERATE_GRADIENT_CLIPPING",
            "ACCELERATE_CONFIG_DS_FIELDS",
        )
        if key.startswith("ACCELERATE_DEEPSPEED_") or key in owned:
            del env[key]


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch, the deepspeed launcher, bigft
    launch) started this process: they all set LOCAL_RANK, which is also what accelerate
    reads to set up a process group."""
    return "LOCAL_RANK" in os.environ


def require_launcher(strategy: str, command: str = "CONFIG") -> None:
    """DeepSpeed and FSDP2 run only inside a process group, which a launcher sets up,
    even for one process; a plain `python` start would crash in accelerate (CPU) or run
    without the engine (GPU FSDP2). `command` is how the user started the run, so the
    advice can repeat it."""
    if strategy == "ddp" or launched():
        return
    raise ConfigError(
        f"parallel.strategy {strategy} needs a distributed launcher, even for one process: "
        f"run `bigft launch {command} --nproc N` (N processes per node, one per GPU; 1 is "
        "fine), or set parallel.strategy=ddp for a plain single-process run"
    )


def _cpu_process_group() -> None:
    """FSDP2 on CPU: accelerate ignores the FSDP plugin when cpu=True, and with gloo but
    no cpu=True it runs unsharded and the ranks' weights diverge. Creating the shared
    state on gloo and marking it multi-device makes accelerate apply fully_shard."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    # Even for one process (bigft launch --nproc 1): accelerate applies FSDP only to a
    # multi-device state.
    PartialState(backend="gloo").distributed_type = DistributedType.MULTI_GPU


def build_accelerator(
    train: TrainConfig,
    parallel: ParallelConfig,
    layout: BatchLayout,
    log_with: list[str] | None = None,
    logging_dir: str | Path | None = None,
) -> Accelerator:
    """One Accelerator for every launch path (python, accelerate launch, torchrun, srun).

    `log_with` names the experiment trackers (checked by `tracking.resolve_trackers`);
    `logging_dir` is where TensorBoard writes.
    """
    require_launcher(parallel.strategy)
    cpu = not torch.cuda.is_available()
    kwargs: dict[str, Any] = {
        "mixed_precision": resolve_precision(train.precision),
        # bigft calls accumulate() exactly grad_accum times per optimizer step and owns
        # the data position, so the end of a dataloader never forces a sync.
        "gradient_accumulation_plugin": GradientAccumulationPlugin(
            num_steps=layout.grad_accum, sync_with_dataloader=False
        ),
        "step_scheduler_with_optimizer": False,
    }
    if log_with:
        from accelerate.utils import ProjectConfiguration

        kwargs["log_with"] = log_with
        kwargs["project_config"] = ProjectConfiguration(logging_dir=logging_dir)
    strategy = parallel.strategy
    if strategy.startswith("zero"):
        from accelerate.utils import DeepSpeedPlugin

        from bigft.errors import require

        require("deepspeed", "deepspeed", f"parallel.strategy: {strategy}")
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(
            hf_ds_config=deepspeed_config(parallel, train, layout)
        )
        kwargs.pop("mixed_precision")  # set inside the DeepSpeed config
        if cpu:
            # NOT cpu=True: that silently turns DeepSpeed into DDP.
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    elif strategy == "fsdp2":
        kwargs["fsdp_plugin"] = fsdp_plugin(parallel, kwargs["mixed_precision"])
        if cpu:
            _cpu_process_group()
    elif cpu:
        # Under torchrun a plain Accelerator() on CPU makes every process rank 0 of 1.
        kwargs["cpu"] = True
    if strategy != "ddp":
        # ACCELERATE_USE_CPU silently turns DeepSpeed and FSDP into DDP.
        os.environ.pop("ACCELERATE_USE_CPU", None)
    accelerator = Accelerator(**kwargs)
    _check_engine(accelerator, strategy)
    if offloads_optimizer_step(parallel):
        torch.set_num_threads(
            offload_threads(
                parallel.offload_threads,
                os.environ.get("OMP_NUM_THREADS"),
                len(os.sched_getaffinity(0)),
                int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
            )
        )
    return accelerator


def release(accelerator: Accelerator) -> None:
    """Free the prepared model, optimizer and loaders, then the process groups, while the
    interpreter is whole. Left to interpreter exit, a sharded model's tensors and the
    gloo groups its device mesh holds are torn down by threads that can no longer take
    the GIL: the worker aborts (SIGABRT) after a finished run. Callers drop their own
    references to the model first."""
    accelerator.free_memory()  # destroys a DeepSpeed engine, drops the prepared objects
    gc.collect()
    accelerator.end_training()  # trackers, then every process group


def _check_engine(accelerator: Accelerator, strategy: str) -> None:
    """Refuse to run a different engine than the one asked for."""
    from accelerate.utils import DistributedType

    expected = {"fsdp2": DistributedType.FSDP}.get(
        strategy, DistributedType.DEEPSPEED if strategy.startswith("zero") else None
    )
    if expected is not None and accelerator.distributed_type != expected:
        raise ConfigError(
            f"parallel.strategy {strategy} was requested but accelerate set up "
            f"{accelerator.distributed_type}; check ACCELERATE_* variables and the launcher"
        )


def print_on_main(
    accelerator: Accelerator, console: Console, message: RenderableType, **options: Any
) -> None:
    """`console.print(message, **options)` on the main process only: every process runs
    the code that reports, and one of them says it."""
    if accelerator.is_main_process:
        console.print(message, **options)
