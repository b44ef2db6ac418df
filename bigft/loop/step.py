"""One optimizer step: `grad_accum` micro-batches whose loss is normalized by the target
tokens of the whole step, a non-finite check every process agrees on, clipping, the update.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import DistributedType

from bigft.engine import preemption
from bigft.engine.settings import resolve_precision
from bigft.loop.preference import METRICS as PREFERENCE_METRICS
from bigft.loop.preference import count_pairs, means, preference_loss_sum
from bigft.loop.run import Run
from bigft.losses import Batch, count_targets, loss_sum, target_mask


def train_step(run: Run, micro_batches: list[Batch], log: bool = True) -> dict[str, Any]:
    """One optimizer step over `grad_accum` micro-batches, handed over on the host. `log`:
    the step's loss is logged (otherwise its "loss" is NaN unless the step was non-finite),
    and with a mixture of sources each source's (`source_losses`, by name).

    Each micro-batch's summed token loss is divided by the target tokens of the whole
    step on all processes, so 4 micro-batches of 1 give the same update as 1 of 4
    whatever the sequence lengths. Accelerate divides by grad_accum and DDP averages over
    processes; the scale below undoes both.

    The host waits for the device once per step, at its end (`_apply_update`): token
    counts are taken from the host batches before they move, and the step's reduce of
    them stays on the device, where it scales the losses.
    """
    acc, model = run.accelerator, run.model
    lr = step_lr(run.optimizer, run.cfg.optim.lr)  # what this step's update uses
    # One collective per step carries the token counts and any process's stop request.
    count = count_pairs if run.cfg.task == "preference" else count_targets
    local = torch.tensor(
        [
            sum(count(b) for b in micro_batches),
            sum(_real_tokens(b) for b in micro_batches),
            preemption.requested() is not None,
        ],
        dtype=torch.float64,
    )
    counts = acc.reduce(local.to(acc.device), reduction="sum")
    scale = (run.layout.grad_accum * acc.num_processes / counts[0].clamp(min=1.0)).float()

    loss_total = torch.zeros((), dtype=torch.float64, device=acc.device)
    # A mixture's loss per source: (summed loss, targets) of each, reduced when logged.
    by_source = (
        torch.zeros((2, len(run.mixture)), dtype=torch.float64, device=acc.device)
        if log and len(run.mixture) > 1
        else None
    )
    # task preference: rewards and log-probabilities, summed with their counts.
    pref_sums = (
        torch.zeros((2, len(PREFERENCE_METRICS)), dtype=torch.float64, device=acc.device)
        if log and run.cfg.task == "preference"
        else None
    )
    update: dict[str, Any] = {}
    for host_batch in micro_batches:
        batch = {k: v.to(acc.device, non_blocking=True) for k, v in host_batch.items()}
        with acc.accumulate(model):
            summed = _loss_sum(run, batch, by_source, pref_sums)
            if run.state.step + 1 in run.nonfinite_steps:  # a test's fault (bigft.faults)
                summed = summed * float("nan")
            acc.backward(summed * scale)
            loss_total += summed.detach().double()
            if acc.sync_gradients:  # the step's last micro-batch: update, or skip it
                update = _apply_update(run, loss_total, counts, log)
    # A skipped step still advances the schedule: lr stays a function of the step number,
    # the same whether or not a run was interrupted and resumed.
    run.scheduler.step()
    if by_source is not None:
        sums, targets = acc.reduce(by_source, reduction="sum").tolist()
        update["source_losses"] = {
            share.name: total / count
            for share, total, count in zip(run.mixture, sums, targets, strict=True)
            if count > 0
        }
    if pref_sums is not None:
        update["preference"] = means(acc.reduce(pref_sums, reduction="sum"))
    return {**update, "lr": lr}


def _apply_update(
    run: Run, loss_total: torch.Tensor, counts: torch.Tensor, log: bool
) -> dict[str, float]:
    """Clip, agree on finiteness, then step the optimizer or skip the update.

    With a gradient norm (clipping, or DeepSpeed's own) the norm decides: it is global
    already (DDP's all-reduced gradients, FSDP2's and DeepSpeed's reduced norms), so every
    process reaches the same decision with no collective of its own, and a NaN/inf loss
    anywhere reaches it through backward. The step's loss is then reduced only when it is
    logged (`log`, or a non-finite step, which is always logged). Without a norm (no
    clipping, or fp16, whose loss scaler overflows on purpose while it calibrates and
    skips those updates itself, so only the loss is checked) the loss reduce is the vote:
    a sum is NaN/inf when any process's addend is, and each process's own gradient check
    rides in the same reduce. DeepSpeed updates inside backward and skips steps with
    non-finite gradients itself (its overflow check; seen with ZeRO-2/3 in fp32, with and
    without clipping); `applied` reports what it did.

    An optimizer that can skip its update on the device (torch's fused AdamW, which
    bigft uses on CUDA) is handed the decision as a tensor (`found_inf`, as a GradScaler
    does), and the host reads the step's figures once, after the update was queued;
    any other optimizer waits for them before it steps.
    """
    acc, model, train = run.accelerator, run.model, run.cfg.train
    grad_norm = None
    if train.max_grad_norm is not None:
        grad_norm = acc.clip_grad_norm_(model.parameters(), train.max_grad_norm)
    if grad_norm is None and hasattr(model, "get_global_grad_norm"):
        grad_norm = model.get_global_grad_norm()  # DeepSpeed clips (and measures) itself
    check_grads = resolve_precision(train.precision) != "fp16"
    deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
    norm = _as_device_scalar(grad_norm, acc.device)
    if check_grads and grad_norm is not None:
        nonfinite = ~norm.isfinite()
        loss_all = acc.reduce(loss_total, reduction="sum") if log else loss_total
        voted = False
    else:
        # Each process checks its own (shard of the) gradients where no engine does.
        own_check = check_grads and not deepspeed
        bad = _grads_nonfinite(model) if own_check else torch.zeros((), dtype=torch.float64)
        votes = acc.reduce(torch.stack([loss_total, bad.to(acc.device)]), reduction="sum")
        loss_all, voted = votes[0], True
        nonfinite = ~loss_all.isfinite() | (votes[1] > 0)
    # Only bigft's own step can be held back: DeepSpeed stepped in backward, and a
    # GradScaler must see the step to lower its scale (it skips the update itself).
    own_step = not deepspeed and acc.scaler is None
    inner = _device_skipping(run.optimizer) if own_step else None
    figures = torch.cat(
        [counts, loss_all.reshape(1), norm.reshape(1), nonfinite.double().reshape(1)]
    )
    if inner is not None:
        inner.found_inf = nonfinite.float()
        try:
            run.optimizer.step()
        finally:
            del inner.found_inf
    targets, tokens, stops, loss_sum_all, norm_value, flag = figures.tolist()  # the wait
    if not (log or voted):
        # Not logged: no process needs the step's loss. A non-finite step (the same on
        # every process: the norm is global) is logged, so its loss is reduced now.
        loss_sum_all = float(acc.reduce(loss_total, reduction="sum")) if flag else float("nan")
    skip = bool(flag) and own_step
    if inner is None and not skip:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    applied = not skip and not acc.optimizer_step_was_skipped
    return {
        "loss": loss_sum_all / max(targets, 1.0),
        "grad_norm": norm_value,
        "nonfinite": bool(flag),
        "applied": applied,
        "tokens": tokens,
        "targets": targets,
        "stop_requests": stops,
    }


def _as_device_scalar(value: Any, device: torch.device) -> torch.Tensor:
    """A gradient norm (a tensor, a DTensor, a float, or None for NaN) as a float64
    scalar on `device`, without reading it on the host."""
    if value is None:
        value = float("nan")
    if isinstance(value, torch.Tensor):
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        return full.detach().to(device=device, dtype=torch.float64).reshape(())
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def _device_skipping(optimizer: Any) -> Any:
    """The torch optimizer under Accelerate's wrapper when it skips its own update given a
    `found_inf` tensor (fused Adam / AdamW / SGD), else None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    fused = getattr(inner, "defaults", {}).get("fused")
    return inner if fused and getattr(inner, "_step_supports_amp_scaling", False) else None


def step_lr(optimizer: Any, base_lr: float) -> float:
    """optim.lr scaled by the schedule as it stands now, i.e. the peak learning rate of
    the coming update (groups with their own lr, e.g. layer-wise decay, scale the same)."""
    group = optimizer.param_groups[0]
    initial = group.get("initial_lr") or group["lr"]
    return base_lr * group["lr"] / initial if initial else 0.0


def _grads_nonfinite(model: Any) -> torch.Tensor:
    """1.0 when this process's gradients hold a NaN/inf, else 0.0 (a float64 tensor on the
    gradients' device: no host sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2 shards
    return (~torch.stack([g.isfinite().all() for g in local]).all()).double()


def _loss_sum(
    run: Run, batch: Batch, by_source: torch.Tensor | None, pref_sums: torch.Tensor | None
) -> torch.Tensor:
    """The micro-batch's summed loss: the task's (`bigft.losses.loss_sum`); for task
    contrastive the InfoNCE of its image-text pairs against the whole global batch; for
    task preference the loss of its pairs (`bigft.loop.preference`)."""
    if run.cfg.task == "preference":
        unwrap = run.accelerator.unwrap_model
        prefs = run.cfg.preference
        return preference_loss_sum(run.model, run.teacher, batch, prefs, unwrap, pref_sums)
    if run.cfg.task == "contrastive":
        from bigft.contrastive import contrastive_loss_sum

        return contrastive_loss_sum(run.model, batch, run.cfg.contrastive)[0]
    cfg = run.cfg.distill
    return loss_sum(run.model, batch, run.teacher, cfg.temperature, cfg.weight, by_source)[0]


def _real_tokens(batch: Batch) -> int:
    """Input tokens that are not padding (packed rows: positions inside a sequence); for
    image tasks, the images."""
    if "pixel_values" in batch:
        return int(batch["pixel_values"].shape[0])
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "position_ids" not in batch:
        return int(batch["input_ids"].numel())
    # Packed rows (one row per micro-batch row, or all of them flattened into one): a
    # sequence starts where position_ids is 0; the padding filling a row's tail is a
    # sequence with no target, while every real sequence holds at least one target.
    starts = batch["position_ids"].reshape(-1) == 0
    starts[0] = True
    segment = starts.long().cumsum(0) - 1
    targets = target_mask(batch["labels"]).reshape(-1).long()
    real = torch.bincount(segment, weights=targets.double()) > 0
    return int(real[segment].sum())
