"""Losses as sums over targets, for every task, with optional distillation.

A batch's `labels` say which task it belongs to: 2-D token labels (-100 = not a target)
for causal LM, 1-D class ids (long, -100 = filler row) for classification, 1-D floats
(NaN = filler row) for regression. Losses are returned as a *sum* plus the number of
targets, so the loop can normalize by the targets of a whole accumulated step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

Batch = dict[str, torch.Tensor]


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the targets among labels aligned with their logits
    (`aligned_labels`): -100 marks a token or row that is not one, NaN a regression
    filler row."""
    return ~torch.isnan(labels) if labels.is_floating_point() else labels != -100


def aligned_labels(labels: torch.Tensor) -> torch.Tensor:
    """A batch's labels aligned position by position with `logits_and_labels`' logits:
    token labels (2-D) lose their first position, since position t predicts token t + 1."""
    return labels[:, 1:] if labels.dim() == 2 else labels


def count_targets(batch: Batch) -> int:
    """Targets in a batch: target tokens (causal LM) or real rows (classification)."""
    return int(target_mask(aligned_labels(batch["labels"])).sum())


def logits_and_labels(model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) aligned position by position.

    Causal LM: logits of every position but the last against the next token's label
    (packed rows carry position_ids and no mask; use_cache=False keeps transformers'
    per-sequence isolation). Classification / regression: one row of logits per example.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    if labels.dim() == 2:
        return model(**inputs, use_cache=False).logits[:, :-1], aligned_labels(labels)
    return model(**inputs).logits, labels


def task_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over targets, or summed squared error for regression."""
    if labels.is_floating_point():
        mask = target_mask(labels)
        # Filler rows hold NaN: replace before the arithmetic so no NaN reaches the graph.
        diff = logits.float().squeeze(-1) - torch.where(mask, labels, 0.0)
        return (diff.pow(2) * mask).sum()
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def distill_loss_sum(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 x KL(teacher || student) at temperature T, summed over target positions
    (Hinton et al.: T^2 keeps the gradient scale independent of T). Regression: squared
    distance to the teacher's prediction."""
    mask = target_mask(labels)
    if labels.is_floating_point():
        diff = (student.float() - teacher.float()).squeeze(-1)
        return (diff.pow(2) * mask).sum()
    if teacher.size(-1) != student.size(-1):
        raise ValueError(
            f"teacher has {teacher.size(-1)} outputs, the student {student.size(-1)}: "
            "distillation needs the same vocabulary / label set"
        )
    log_p_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return (kl * mask).sum() * temperature**2


def loss_sum(
    model: Any,
    batch: Batch,
    teacher: Any | None = None,
    temperature: float = 2.0,
    weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, number of targets) of one batch, for training and evaluation alike;
    with a teacher, the distillation mix (1 - weight) x task + weight x T^2 x KL."""
    logits, labels = logits_and_labels(model, batch)
    loss = task_loss_sum(logits, labels)
    if teacher is not None and weight > 0:
        with torch.no_grad():
            teacher_logits, _ = logits_and_labels(teacher, batch)
        kd = distill_loss_sum(logits, teacher_logits, labels, temperature)
        loss = (1 - weight) * loss + weight * kd
    return loss, target_mask(labels).sum()
