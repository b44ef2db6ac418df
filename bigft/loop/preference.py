"""task preference in the loop: one forward of a batch's chosen and rejected sequences
(or KTO's rows and their mismatched copies), the reference model's log-probabilities,
and the loss of section `preference` (`bigft.preference_losses`).

The reference costs no second copy where it can be avoided:
- lora / dora / qlora: the policy itself with its adapters disabled (peft's
  `disable_adapter`), under no_grad;
- full fine-tuning: a frozen copy loaded and laid out like a distillation teacher (ZeRO-3
  partitions it, FSDP2 shards it), held in `run.teacher`;
- preference.precompute_reference: log-probabilities scored once before step 1
  (`bigft.loop.reference`), read from the batch;
- simpo, orpo: none.

The loss of a micro-batch is the sum over its pairs (KTO: rows); the step divides by the
pairs of the whole step on all processes, as causal LM divides by target tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from bigft.losses import Batch, model_inputs
from bigft.preference_losses import (
    KtoLogps,
    PairLogps,
    needs_reference,
    preference_loss,
    sequence_logps,
)

# What a preference step and evaluation report (means over pairs; KTO: over the rows
# each one applies to), beside the loss.
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margin",
    "rewards/accuracy",
    "logps/chosen",
    "logps/rejected",
)


def _logps(model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(**model_inputs(batch), use_cache=False).logits
    return sequence_logps(logits, batch["labels"])


@torch.no_grad()
def reference_logps(
    model: Any, reference: Any, batch: Batch, unwrap: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference model's (summed logps, target tokens) of every row: the frozen copy
    when there is one, else the policy with its adapters disabled."""
    if reference is not None:
        return _logps(reference, batch)
    if not hasattr(unwrap(model), "disable_adapter"):
        raise ValueError("no reference model: full fine-tuning needs the frozen copy")
    return initial_logps(model, batch, unwrap)


@torch.no_grad()
def initial_logps(model: Any, batch: Batch, unwrap: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed logps, target tokens) of every row under the policy as it was loaded: with
    its adapters disabled when it has them (the reference of an adapter run, at any step),
    else the model itself (the reference of full fine-tuning before its first step)."""
    inner = unwrap(model)
    if hasattr(inner, "disable_adapter"):
        with inner.disable_adapter():
            return _logps(inner, batch)
    return _logps(model, batch)


def preference_loss_sum(
    model: Any,
    reference: Any,
    batch: Batch,
    cfg: Any,
    unwrap: Any,
    sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """The summed loss of a batch's pairs (filler pairs, whose labels are all -100,
    count for nothing). `sums` (2 x len(METRICS)): each metric's sum over the pairs it
    applies to (row 0) and their count (row 1) are added to it."""
    policy_sum, policy_n = _logps(model, batch)
    ref_sum = None
    if "ref_logps" in batch:  # preference.precompute_reference
        ref_sum = batch["ref_logps"].to(policy_sum.dtype)
    elif needs_reference(cfg):
        ref_sum, _ = reference_logps(model, reference, batch, unwrap)
    kl = None
    if cfg.loss == "kto":
        rows = policy_sum.shape[0] - int(batch["kl_rows"])
        desirable = batch["desirable"].bool()
        assert ref_sum is not None
        policy: Any = KtoLogps(policy_sum[:rows], desirable)
        ref: Any = KtoLogps(ref_sum[:rows], desirable)
        real = policy_n[:rows] > 0
        kl = kto_reference_point(policy_sum[rows:], ref_sum[rows:], policy_n[rows:] > 0)
    else:
        pairs = int(batch["pair_rows"])
        policy = PairLogps(
            policy_sum[:pairs], policy_sum[pairs:], policy_n[:pairs], policy_n[pairs:]
        )
        ref = None if ref_sum is None else PairLogps(ref_sum[:pairs], ref_sum[pairs:])
        real = policy_n[:pairs] > 0
    losses, metrics = preference_loss(cfg, policy, ref, kl)
    if sums is not None:
        for i, name in enumerate(METRICS):
            values = metrics.get(name)
            if values is None:
                continue
            keep = real & ~torch.isnan(values)
            sums[0, i] += values[keep].double().sum()
            sums[1, i] += keep.double().sum()
    return (losses * real).sum()


def kto_reference_point(
    policy_kl: torch.Tensor, reference_kl: torch.Tensor, real: torch.Tensor
) -> torch.Tensor:
    """KTO's z0 before clamping: the mean policy - reference log-ratio of the mismatched
    rows (`kto_kl_estimate`), over the real ones of every process (an all_reduce of their
    sum and count, as TRL gathers it), so all processes share one z0. Every process calls
    it once per micro-batch; 0 where no process has a mismatched row (micro-batches of one)."""
    diff = policy_kl.detach().float() - reference_kl.detach().float()
    stats = torch.stack([diff[real].sum(), real.sum().float()])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(stats)
    return stats[0] / stats[1].clamp(min=1.0)


def count_pairs(batch: Batch) -> int:
    """Pairs (KTO: rows) of a preference batch that hold targets: what its loss is
    divided by."""
    labels = batch["labels"]
    rows = (
        int(batch["pair_rows"]) if "pair_rows" in batch else labels.shape[0] - int(batch["kl_rows"])
    )
    return int(((labels[:rows, 1:] != -100).any(-1)).sum())


def means(sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Each metric's mean from reduced `sums` (the metrics that had no pair left out)."""
    values, counts = sums.tolist()
    result = {
        f"{prefix}{name}": value / count
        for name, value, count in zip(METRICS, values, counts, strict=True)
        if count > 0
    }
    chosen, rejected = f"{prefix}rewards/chosen", f"{prefix}rewards/rejected"
    if f"{prefix}rewards/margin" not in result and chosen in result and rejected in result:
        # KTO's rows are unpaired: the margin of the mean desirable and undesirable rewards
        result[f"{prefix}rewards/margin"] = result[chosen] - result[rejected]
    return result


@torch.no_grad()
def evaluate_preference(
    model: Any, reference: Any, batches: Any, accelerator: Any, cfg: Any
) -> dict[str, Any]:
    """Mean loss per pair and the mean rewards / log-probabilities over all processes
    (`eval_loss`, `eval_rewards/accuracy`, ...)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros((2, len(METRICS)), dtype=torch.float64, device=accelerator.device)
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for batch in batches:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        loss = preference_loss_sum(model, reference, batch, cfg, accelerator.unwrap_model, sums)
        total += torch.stack(
            [
                loss.double(),
                torch.tensor(float(count_pairs(batch)), device=total.device, dtype=torch.float64),
            ]
        )
    model.train(was_training)
    if hasattr(model, "empty_partition_cache"):
        # ZeRO-3: the policy's forwards, interleaved with the reference engine's, leave
        # prefetched parameters in flight; release them, as a training step's backward does.
        model.empty_partition_cache()
    sums = accelerator.reduce(sums, reduction="sum")
    loss_sum, pairs = accelerator.reduce(total, reduction="sum").tolist()
    return {
        "eval_loss": loss_sum / max(pairs, 1.0),
        **means(sums, "eval_"),
        "eval_pairs": int(pairs),
    }
