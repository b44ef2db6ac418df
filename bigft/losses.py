"""Losses as sums over targets, for every task, with optional distillation.

A batch's `labels` say which task it belongs to: 2-D token labels (-100 = not a target)
for causal LM, 1-D class ids (long, -100 = filler row) for classification, 1-D floats
(NaN = filler row) for regression. Losses are returned as a *sum* plus the number of
targets, so the loop can normalize by the targets of a whole accumulated step.

Every loss is the sum of `position_losses`, one value per position. For causal LM the
model's lm_head may compute them itself, chunk by chunk, without the B x L x V logits:
`causal_lm_loss_sum` posts a `HeadRequest` (labels aligned with the hidden positions) in
`HEAD_REQUEST` for the length of the forward, and a head installed by
`bigft.chunked_loss.prepare_loss` answers it with the (B, L, 1) losses in place of logits.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
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


# Batch entries for bigft's loss, never for the model: the labels (bigft computes the
# loss itself), each token's source in a mixture (the per-source loss), each caption's id
# (contrastive retrieval metrics) and the layout of a preference batch.
NOT_MODEL_INPUTS = (
    "labels",
    "source_ids",
    "caption_ids",
    "pair_rows",
    "kl_rows",
    "desirable",
    "ref_logps",
)


def model_inputs(batch: Batch) -> Batch:
    """The batch without the entries only bigft's loss reads: what the model is called
    with."""
    return {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}


def add_by_source(
    by_source: torch.Tensor, losses: torch.Tensor, labels: torch.Tensor, sources: torch.Tensor
) -> None:
    """Add per-position `losses` to `by_source` (2 x sources): row 0 the summed loss, row
    1 the targets, of each source. `labels` and `sources` (each position's source, -1 for
    none) are aligned with `losses`."""
    mask = target_mask(labels).reshape(-1) & (sources.reshape(-1) >= 0)
    picked = sources.reshape(-1)[mask]
    by_source[0].index_add_(0, picked, losses.detach().reshape(-1)[mask].to(by_source.dtype))
    by_source[1].index_add_(0, picked, torch.ones_like(picked, dtype=by_source.dtype))


def logits_and_labels(model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) aligned position by position.

    Causal LM: logits of every position but the last against the next token's label
    (packed rows carry position_ids and no mask; use_cache=False keeps transformers'
    per-sequence isolation). Classification / regression: one row of logits per example.
    """
    inputs, labels = model_inputs(batch), batch["labels"]
    if labels.dim() == 2:
        return model(**inputs, use_cache=False).logits[:, :-1], aligned_labels(labels)
    return model(**inputs).logits, labels


def task_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per position in fp32 (0 where labels is -100), or squared error per
    row for regression (0 on filler rows); shaped like labels."""
    mask = target_mask(labels)
    if labels.is_floating_point():
        # Filler rows hold NaN: replace before the arithmetic so no NaN reaches the graph.
        diff = logits.float().squeeze(-1) - torch.where(mask, labels, 0.0)
        return diff.pow(2) * mask
    losses = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    )
    return losses.view(labels.shape)


def distill_losses(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 x KL(teacher || student) at temperature T per target position, 0 elsewhere
    (Hinton et al.: T^2 keeps the gradient scale independent of T). Regression: squared
    distance to the teacher's prediction."""
    mask = target_mask(labels)
    if labels.is_floating_point():
        diff = (student.float() - teacher.float()).squeeze(-1)
        return diff.pow(2) * mask
    if teacher.size(-1) != student.size(-1):
        raise ValueError(
            f"teacher has {teacher.size(-1)} outputs, the student {student.size(-1)}: "
            "distillation needs the same vocabulary / label set"
        )
    log_p_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return kl * mask * temperature**2


def position_losses(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher: torch.Tensor | None = None,
    temperature: float = 2.0,
    weight: float = 0.0,
) -> torch.Tensor:
    """The loss of each position (shaped like labels, fp32, 0 where there is no target):
    the task loss, or with teacher logits the distillation mix
    (1 - weight) x task + weight x T^2 x KL."""
    loss = task_losses(logits, labels)
    if teacher is not None and weight > 0:
        kd = distill_losses(logits, teacher, labels, temperature)
        loss = (1 - weight) * loss + weight * kd
    return loss


def task_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over targets, or summed squared error for regression."""
    return task_losses(logits, labels).sum()


def distill_loss_sum(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """`distill_losses` summed over the targets."""
    return distill_losses(student, teacher, labels, temperature).sum()


@dataclass
class HeadRequest:
    """What `causal_lm_loss_sum` asks of the model's lm_head for one forward, and the
    head's answer."""

    labels: torch.Tensor  # (B, L): the target of each hidden position, -100 for none
    teacher: torch.Tensor | None  # (B, L, V) teacher logits, or None
    temperature: float
    weight: float
    sources: torch.Tensor | None = None  # (B, L): the source of each target, -1 for none
    by_source: torch.Tensor | None = None  # where the head adds each source's loss
    head: Any = None  # the head that answered (it has `fall_back(reason)`)
    output: torch.Tensor | None = None  # the (B, L, 1) losses it returned
    version: int = 0  # the output's version counter then (in-place edits raise it)

    def answered_by(self, logits: torch.Tensor) -> bool:
        """Whether the model's logits are the head's output untouched: the same tensor,
        or one over the same memory, unmodified. DeepSpeed ZeRO-3's forward hook hands
        on `output.detach()` through an autograd function (its pre-backward hook); a
        softcap, a scale or a dtype cast would make a new tensor."""
        out = self.output
        if out is None or not (logits is out or logits.is_set_to(out)):
            return False
        return logits.is_inference() or logits._version == self.version


HEAD_REQUEST: ContextVar[HeadRequest | None] = ContextVar("bigft_head_request", default=None)


def causal_lm_loss_sum(
    model: Any,
    batch: Batch,
    teacher_logits: torch.Tensor | None = None,
    temperature: float = 2.0,
    weight: float = 0.0,
    by_source: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed causal-LM loss of one batch (token labels, -100 = not a target).

    `teacher_logits`: the teacher's B x L x V logits for distillation (still materialised,
    computed by the caller without grad). The student runs once; when its head answered
    the request its output is the loss per position, otherwise the full logits are scored.
    A model that changed the head's output after the module call cannot be scored from
    it: the head falls back to the full path for good and this batch runs again.
    `by_source` (2 x sources), for a batch with `source_ids`: see `add_by_source`.
    """
    labels = batch["labels"]
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts token t + 1
    request = HeadRequest(targets, teacher_logits, temperature, weight)
    if by_source is not None and "source_ids" in batch:
        request.sources = F.pad(batch["source_ids"][:, 1:], (0, 1), value=-1)
        request.by_source = by_source
    saved = by_source.clone() if by_source is not None else None
    token = HEAD_REQUEST.set(request)
    try:
        logits = model(**model_inputs(batch), use_cache=False).logits
    finally:
        HEAD_REQUEST.reset(token)
    if request.head is None:
        teacher = teacher_logits[:, :-1] if teacher_logits is not None else None
        losses = position_losses(logits[:, :-1], labels[:, 1:], teacher, temperature, weight)
        if request.by_source is not None and request.sources is not None:
            add_by_source(request.by_source, losses, labels[:, 1:], request.sources[:, :-1])
        return losses.sum()
    if request.answered_by(logits):
        return logits.sum()  # the head added each source's loss itself
    request.head.fall_back("the model transforms the lm_head's output after the module call")
    if by_source is not None and saved is not None:  # forget what the head added
        by_source.copy_(saved)
    return causal_lm_loss_sum(model, batch, teacher_logits, temperature, weight, by_source)


def loss_sum(
    model: Any,
    batch: Batch,
    teacher: Any | None = None,
    temperature: float = 2.0,
    weight: float = 0.0,
    by_source: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, number of targets) of one batch, for training and evaluation alike;
    with a teacher, the distillation mix (1 - weight) x task + weight x T^2 x KL.

    Causal LM goes through `causal_lm_loss_sum`: chunked inside the lm_head call when
    `bigft.chunked_loss.prepare_loss` installed it there, from the full logits otherwise.
    """
    labels = batch["labels"]
    causal = labels.dim() == 2
    teacher_logits = None
    if teacher is not None and weight > 0:
        extra = {"use_cache": False} if causal else {}
        with torch.no_grad():
            teacher_logits = teacher(**model_inputs(batch), **extra).logits
    if causal:
        loss = causal_lm_loss_sum(model, batch, teacher_logits, temperature, weight, by_source)
        return loss, target_mask(aligned_labels(labels)).sum()
    logits = model(**model_inputs(batch)).logits
    loss = position_losses(logits, labels, teacher_logits, temperature, weight).sum()
    return loss, target_mask(labels).sum()
