"""What is really in effect once the engine holds the model: the engine's own report, every
process's digest of the full weights, peak host and device memory. Several engines fall back
silently on CPU; these read back what ran so runs and tests can prove it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator

if TYPE_CHECKING:
    pass


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
    compiled = sum(
        getattr(m, "_compiled_call_impl", None) is not None
        for m in accelerator.unwrap_model(model).modules()
    )
    if compiled:
        report["compiled_modules"] = compiled  # train.compile
    if torch.get_float32_matmul_precision() != "highest":
        report["float32_matmul_precision"] = torch.get_float32_matmul_precision()  # TF32
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
