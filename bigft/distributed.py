"""Build the Accelerator (DDP, DeepSpeed ZeRO-1/2/3, FSDP2) and the batch layout.

The only module that configures DeepSpeed. Several engines fall back silently on CPU
(see `_cpu_process_group`); `engine_report()` reads back what is really in effect so
runs and tests can prove it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs

from bigft.config import ParallelConfig, TrainConfig
from bigft.errors import ConfigError
from bigft.precision import resolve_precision

if TYPE_CHECKING:
    from rich.console import Console, RenderableType


def world_size_from_env() -> int:
    """Processes in the job, as set by torchrun / accelerate launch / srun (1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's rows are spread: micro-batch x accumulation x processes."""

    micro_batch_size: int
    grad_accum: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size


def batch_layout(
    train: TrainConfig, world_size: int, micro_batch_size: int | None = None
) -> BatchLayout:
    """Derive gradient accumulation from global_batch_size (or take it as given)."""
    micro = micro_batch_size or train.micro_batch_size
    if micro == "auto":
        raise ConfigError(
            "train.micro_batch_size: 'auto' needs a GPU to plan for; set an integer "
            "(e.g. train.micro_batch_size=4) or see `bigft plan`"
        )
    assert isinstance(micro, int)
    if train.global_batch_size is None:
        return BatchLayout(micro, train.grad_accum or 1, world_size)
    per_step = micro * world_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size {train.global_batch_size} is not a multiple of "
            f"micro_batch_size {micro} x {world_size} process(es) = {per_step}"
        )
    accum = train.global_batch_size // per_step
    if train.grad_accum is not None and train.grad_accum != accum:
        raise ConfigError(
            f"train.grad_accum {train.grad_accum} contradicts train.global_batch_size "
            f"{train.global_batch_size}, which needs grad_accum {accum} with micro_batch_size "
            f"{micro} x {world_size} process(es); set only one of the two"
        )
    return BatchLayout(micro, accum, world_size)


def deepspeed_config(
    parallel: ParallelConfig, train: TrainConfig, layout: BatchLayout
) -> dict[str, Any]:
    """A complete DeepSpeed config generated from bigft's settings.

    'auto' is left only in the bucket sizes when parallel.reduce_bucket_size is unset:
    accelerate fills them from the model's hidden_size at prepare (zero.Init, earlier,
    allocates no bucket). A fixed size does not fit every model: 5e7 elements are 190 MiB
    per rank in fp32 whatever the model's size (bench/RESULTS.md, host RAM).
    """
    stage = int(parallel.strategy[-1])
    precision = resolve_precision(train.precision)
    bucket = parallel.reduce_bucket_size
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": bucket or "auto",
    }
    if parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if stage == 3:
        # Without this, save_model on ZeRO-3 writes an empty state dict.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        # accelerate's rule for hidden_size h: reduce bucket h^2, prefetch 0.9 h^2,
        # parameters under 10 h elements stay gathered
        zero["stage3_prefetch_bucket_size"] = int(0.9 * bucket) if bucket else "auto"
        zero["stage3_param_persistence_threshold"] = 10 * math.isqrt(bucket) if bucket else "auto"
        if parallel.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "train_batch_size": layout.global_batch_size,
        "gradient_clipping": train.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # fp16 needs dynamic loss scaling (older GPUs without bf16).
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # bigft passes its own optimizer: with offload, adamw is DeepSpeed's CPU Adam
        # (optim.build_optimizer); the others (8-bit, adafactor, sgd) stay allowed.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if parallel.deepspeed_config:
        config = _merge_user_deepspeed(parallel.deepspeed_config, config)
    return config


def _merge_user_deepspeed(path: str, generated: dict[str, Any]) -> dict[str, Any]:
    """Start from the user's JSON; values bigft owns must agree with the bigft config."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"parallel.deepspeed_config: '{path}' not found")
    try:
        user = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    owned = {
        "train_micro_batch_size_per_gpu": "train.micro_batch_size",
        "gradient_accumulation_steps": "train.grad_accum / global_batch_size",
        "train_batch_size": "train.global_batch_size",
        "gradient_clipping": "train.max_grad_norm",
    }
    for key, bigft_key in owned.items():
        if key in user and user[key] != "auto" and user[key] != generated[key]:
            raise ConfigError(
                f"{path}: {key} = {user[key]} contradicts {bigft_key} (= {generated[key]}); "
                f"remove it from the JSON or set 'auto'"
            )
    for section in ("bf16", "fp16"):
        user_on = user.get(section, {}).get("enabled")
        if user_on not in (None, "auto") and bool(user_on) != generated[section]["enabled"]:
            raise ConfigError(
                f"{path}: {section}.enabled = {user_on} contradicts train.precision; "
                "set it in one place only"
            )
    stage = user.get("zero_optimization", {}).get("stage")
    if stage is not None and stage != generated["zero_optimization"]["stage"]:
        raise ConfigError(
            f"{path}: zero_optimization.stage = {stage} contradicts parallel.strategy"
        )
    merged = {**generated, **{k: v for k, v in user.items() if v != "auto"}}
    merged["zero_optimization"] = {
        **generated["zero_optimization"],
        **user.get("zero_optimization", {}),
    }
    for key in owned:
        merged[key] = generated[key]
    return merged


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


def offloads_optimizer_step(parallel: ParallelConfig) -> bool:
    """DeepSpeed ZeRO-Offload: the optimizer step runs on the CPU (where bigft uses
    DeepSpeed's CPU Adam and gives each process its share of the cores)."""
    return parallel.strategy.startswith("zero") and parallel.offload_optimizer


def offload_threads(
    configured: int | None, omp_num_threads: str | None, cores: int, local_processes: int
) -> int:
    """CPU threads per process for an offloaded optimizer step.

    torchrun, accelerate launch and bigft launch all set OMP_NUM_THREADS=1 when it is
    unset, which leaves a CPU Adam step over a whole model partition on one core while
    the others idle; so only a larger value counts as the user's choice.
    """
    if configured is not None:
        return configured
    if omp_num_threads and omp_num_threads.strip().isdigit() and int(omp_num_threads) > 1:
        return int(omp_num_threads)
    return max(1, cores // max(1, local_processes))


def fsdp_mixed_precision(precision: str, reduce_dtype: str) -> Any:
    """FSDP2's MixedPrecisionPolicy for accelerate's mixed_precision value: compute in
    bf16/fp16, reduce (and accumulate across micro-batches) in `reduce_dtype`. None for
    fp32. accelerate's own policy reduces in the compute dtype; it keeps one passed in."""
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if compute is None:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=getattr(torch, reduce_dtype))


def fsdp_plugin(parallel: ParallelConfig, mixed_precision: str) -> Any:
    """accelerate's FSDP2 plugin from bigft's parallel settings (`mixed_precision` is
    accelerate's value, from `resolve_precision`)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=parallel.fsdp_layer_cls,
        reshard_after_forward=parallel.fsdp_reshard_after_forward,
        cpu_offload=parallel.offload_params or parallel.offload_optimizer,
        state_dict_type="SHARDED_STATE_DICT",
        # prepare() shards the model on the meta device and fills the shards from
        # rank 0; load_model(from_rank0=True) spares the other ranks reading weights.
        cpu_ram_efficient_loading=parallel.fsdp_cpu_ram_efficient_loading,
        mixed_precision_policy=fsdp_mixed_precision(mixed_precision, parallel.fsdp_reduce_dtype),
    )


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


def check_fsdp_layers(model: Any, parallel: ParallelConfig) -> None:
    """FSDP2 wraps decoder layers by class name; an unknown name is a config error."""
    if parallel.strategy != "fsdp2":
        return
    present = {type(m).__name__ for m in model.modules()}
    wanted = parallel.fsdp_layer_cls or list(getattr(model, "_no_split_modules", None) or [])
    missing = [name for name in wanted if name not in present]
    if missing or not wanted:
        candidates = sorted(n for n in present if "Layer" in n or "Block" in n)
        raise ConfigError(
            f"parallel.fsdp_layer_cls: {', '.join(missing) or '(none)'} not found in the "
            f"model; its layer classes: {', '.join(candidates) or 'none found'}"
        )


def engine_report(accelerator: Accelerator, model: Any, optimizer: Any = None) -> dict[str, Any]:
    """What is really running: distributed type, ZeRO stage, share of parameters held,
    FSDP2's compute / gradient-reduction dtypes and, given the prepared optimizer, the
    optimizer class that steps (under the engine's wrappers) with its groups."""
    report: dict[str, Any] = {
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "world_size": accelerator.num_processes,
        "torch_threads": torch.get_num_threads(),
    }
    if hasattr(model, "zero_optimization_stage"):
        report["zero_stage"] = int(model.zero_optimization_stage())
    report.update(_fsdp_dtypes(model))
    if optimizer is not None:
        from bigft.optim import optimizer_report

        report["optimizer"] = optimizer_report(optimizer)
    local = full = 0
    for param in accelerator.unwrap_model(model).parameters():
        ds_numel = getattr(param, "ds_numel", None)  # ZeRO-3 partitioned parameter
        if ds_numel is not None:
            full += ds_numel
            local += param.ds_tensor.numel()
        elif hasattr(param, "to_local"):  # FSDP2 DTensor shard
            full += param.numel()
            local += param.to_local().numel()
        else:
            full += param.numel()
            local += param.numel()
    report["param_fraction_local"] = round(local / max(full, 1), 4)
    return report


def _fsdp_dtypes(model: Any) -> dict[str, str]:
    """The dtypes FSDP2 computes and reduces gradients in, read from the policy each
    fully_shard unit really holds: gradients are computed in param_dtype (or the stored
    dtype) and reduced in reduce_dtype (or the compute dtype when unset)."""
    from torch.distributed.fsdp import FSDPModule

    found: set[tuple[str, str]] = set()
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        for group in getattr(state, "_fsdp_param_groups", None) or [state._fsdp_param_group]:
            if group is None:
                continue
            policy = group.mp_policy
            for fsdp_param in group.fsdp_params:
                if not fsdp_param.sharded_param.requires_grad:
                    continue  # frozen: nothing to reduce
                compute = policy.param_dtype or fsdp_param.sharded_param.dtype
                found.add((str(compute), str(policy.reduce_dtype or compute)))
    if not found:
        return {}
    compute, reduce = (",".join(sorted({pair[i] for pair in found})) for i in (0, 1))
    return {
        "fsdp_param_dtype": compute.replace("torch.", ""),
        "fsdp_reduce_dtype": reduce.replace("torch.", ""),
    }


def full_weights_digest(accelerator: Accelerator, model: Any) -> list[str]:
    """sha256 of each process's full (gathered) weights, one entry per process.

    Every process gathers its view of the complete model (ZeRO-3 partitions and FSDP2
    shards included), so equal digests prove the ranks agree on every weight.
    """
    import hashlib
    from contextlib import nullcontext

    unwrapped = accelerator.unwrap_model(model)
    params = list(unwrapped.named_parameters())
    gather: Any = nullcontext()
    if any(hasattr(p, "ds_numel") for _, p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
    digest = hashlib.sha256()
    with gather, torch.no_grad():
        for name, param in sorted(params, key=lambda item: item[0]):
            tensor = param.full_tensor() if hasattr(param, "full_tensor") else param
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    mine = digest.hexdigest()
    if accelerator.num_processes == 1:
        return [mine]
    everyone: list[Any] = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(everyone, mine)
    return [str(d) for d in everyone]


def peak_rss_mib_per_rank(accelerator: Accelerator) -> list[float]:
    """Peak resident host memory of every process (MiB): what loading and training cost
    in CPU RAM, where ZeRO-3 / FSDP2 must not hold a full model copy per rank."""
    mine = _peak_rss_mib()
    if accelerator.num_processes == 1:
        return [round(mine, 1)]
    everyone: list[Any] = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(everyone, round(mine, 1))
    return [float(x) for x in everyone]


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_memory_mib(accelerator: Accelerator) -> float:
    """Peak memory of the busiest process so far (MiB): CUDA memory allocated by tensors
    on GPU, peak resident host memory on CPU. The busiest process is the one that runs
    out first, so that is the number to compare with the device's memory."""
    if accelerator.device.type == "cuda":
        mine = torch.cuda.max_memory_allocated(accelerator.device) / 2**20
    else:
        mine = _peak_rss_mib()
    peak = torch.tensor(mine, dtype=torch.float64, device=accelerator.device)
    return round(float(accelerator.reduce(peak, reduction="max")), 1)
