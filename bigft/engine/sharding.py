"""DeepSpeed and FSDP2 settings from the config: the generated DeepSpeed config (merged with a
user's file), optimizer offload, FSDP2's plugin and mixed precision.

The only module that configures DeepSpeed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bigft.config import ParallelConfig, TrainConfig
from bigft.engine.settings import BatchLayout, resolve_precision
from bigft.errors import ConfigError

if TYPE_CHECKING:
    pass


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
