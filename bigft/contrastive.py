"""task contrastive: CLIP's symmetric InfoNCE loss (Radford et al. 2021) and its metrics.

A batch (a dict of tensors on the model's device):
  pixel_values    (B, 3, H, W)  one image per row
  input_ids       (T, L)        rows 0..B-1: the caption of each image; rows B..T-1 (if
  attention_mask  (T, L)        any): one prompt per class of data.label_names
  labels          (B,)          class id of each row, NO_CLASS (-1) for a row without
                                one, FILLER (-100) for a padding row that counts for nothing
Shape suffixes below: b local rows, n candidate rows (every process's), k classes, d the
embedding width.

The loss is returned as a SUM over the local real rows with their count, so the training
loop can normalize by the rows of the whole (accumulated, all-process) step, as it does
with tokens for the language-model tasks.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from bigft.config import ContrastiveConfig

FILLER = -100
NO_CLASS = -1
MAX_SCALE = (
    100.0  # CLIP clamps exp(logit_scale) here "to prevent scaling the logits by more than 100"
)


def class_prompts(label_names: list[str], prompt: str) -> list[str]:
    """The zero-shot text of each class: `prompt` with {label} replaced by its name (no
    str.format, so other braces in the prompt stay as written)."""
    return [prompt.replace("{label}", name) for name in label_names]


def logit_scale(model: torch.nn.Module) -> torch.Tensor:
    """exp(logit_scale) of a CLIP-like model, clamped to MAX_SCALE, differentiable.

    Found by parameter name, so it works through any wrapper (DDP, a DeepSpeed engine,
    PEFT), all of which yield the same Parameter object. Above MAX_SCALE the temperature
    gets no gradient (the clamp), as in CLIP.
    """
    for name, param in model.named_parameters():
        if name == "logit_scale" or name.endswith(".logit_scale"):
            if param.numel() != 1:
                raise ValueError(
                    f"{name} holds {param.numel()} values here: a sharded engine (ZeRO-3, "
                    "FSDP) partitions it outside the forward; use DDP or ZeRO-1/2"
                )
            return param.float().exp().clamp(max=MAX_SCALE).reshape(())
    raise ValueError("the model has no logit_scale parameter: task contrastive needs a CLIP model")


def embed(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of the (possibly wrapped) model: L2-normalized fp32 image (B, d) and
    text (T, d) embeddings. The wrapper's forward is called (never get_image_features),
    so DDP and DeepSpeed see a normal step."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
    )
    # CLIPModel already normalizes; again here for models that return raw projections
    image_bd = F.normalize(out.image_embeds.float(), dim=-1)
    text_td = F.normalize(out.text_embeds.float(), dim=-1)
    return image_bd, text_td


def _distributed(gather: bool) -> bool:
    dist = torch.distributed
    return gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_rows(
    image_bd: torch.Tensor, caption_bd: torch.Tensor, labels_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Every process's rows, differentiably: (images, captions, labels, offset of this
    process's first row). Processes may hold different row counts: each pads to the
    largest with FILLER rows, which the caller drops."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_nn

    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([labels_b.shape[0]], device=labels_b.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    most = max(int(s) for s in sizes)
    pad = most - labels_b.shape[0]
    both_bd = torch.cat([image_bd, caption_bd], dim=1)  # one collective for both towers
    if pad:
        both_bd = torch.cat([both_bd, both_bd.new_zeros(pad, both_bd.shape[1])])
        labels_b = torch.cat([labels_b, labels_b.new_full((pad,), FILLER)])
    all_labels = [torch.empty_like(labels_b) for _ in range(world)]
    dist.all_gather(all_labels, labels_b)
    with warnings.catch_warnings():
        # deprecated in favour of _functional_collectives.all_gather_single (private);
        # both are differentiable on gloo and NCCL
        warnings.simplefilter("ignore", FutureWarning)
        parts = dist_nn.all_gather(both_bd)
    both_nd = torch.cat(parts)
    d = image_bd.shape[1]
    return both_nd[:, :d], both_nd[:, d:], torch.cat(all_labels), rank * most


def contrastive_loss_sum(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: ContrastiveConfig
) -> tuple[torch.Tensor, int]:
    """(sum over the local real rows of each row's loss, number of those rows).

    A row's loss is CLIP's symmetric InfoNCE, halved: cross-entropy of its image against
    every candidate caption plus of its caption against every candidate image, logits
    scaled by exp(logit_scale). Candidates are the real rows of this process or, with
    cfg.gather under torch.distributed, of every process (a differentiable all_gather:
    summed over processes, the losses and the gradients equal those of one process holding
    the global batch). With cfg.classification_weight > 0 and prompt rows in the batch, a
    labelled row adds weight x cross-entropy of its image against the class prompts.

    Every process must run this and backward its result on each step, even with no real
    rows: the gather's backward is a collective.
    """
    labels_b = batch["labels"]
    image_bd, text_td = embed(model, batch)
    b = labels_b.shape[0]
    caption_bd, prompt_kd = text_td[:b], text_td[b:]
    scale = logit_scale(model)

    if _distributed(cfg.gather):
        cand_img_nd, cand_txt_nd, cand_labels_n, offset = _gather_rows(
            image_bd, caption_bd, labels_b
        )
    else:
        cand_img_nd, cand_txt_nd, cand_labels_n, offset = image_bd, caption_bd, labels_b, 0
    cand_real_n = cand_labels_n != FILLER
    # each anchor's own pair among the kept candidates
    position_n = torch.cumsum(cand_real_n.long(), 0) - 1
    anchors = torch.nonzero(labels_b != FILLER).squeeze(1)
    target_a = position_n[anchors + offset]
    cand_img_nd, cand_txt_nd = cand_img_nd[cand_real_n], cand_txt_nd[cand_real_n]

    img_ad, cap_ad = image_bd[anchors], caption_bd[anchors]
    i2t_an = scale * img_ad @ cand_txt_nd.T
    t2i_an = scale * cap_ad @ cand_img_nd.T
    loss_a = 0.5 * (
        F.cross_entropy(i2t_an, target_a, reduction="none")
        + F.cross_entropy(t2i_an, target_a, reduction="none")
    )
    if cfg.classification_weight > 0 and prompt_kd.shape[0] > 0:
        class_a = labels_b[anchors]
        logits_ak = scale * img_ad @ prompt_kd.T
        ce_a = F.cross_entropy(logits_ak, class_a.clamp(min=0), reduction="none")
        loss_a = loss_a + cfg.classification_weight * ce_a * (class_a >= 0)
    # the zero terms keep every parameter and the gather in the graph when this process
    # has no real row (DDP expects a gradient for each parameter, the gather a backward)
    total = loss_a.sum() + 0.0 * (cand_img_nd.sum() + cand_txt_nd.sum() + text_td.sum() + scale)
    return total, int(anchors.numel())


# ---- evaluation: whole eval-set embeddings on one process, no gradients -----------------


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def contrastive_eval_loss(
    image_nd: torch.Tensor, text_nd: torch.Tensor, scale: float, chunk: int = 1024
) -> float:
    """Mean over the N rows of the symmetric InfoNCE loss with all N rows as candidates:
    the training loss of one batch holding the whole eval set, so it does not depend on
    the eval batch size or the number of processes. Rows whose captions repeat are still
    each other's negatives, so a perfect model does not reach 0. Computed in chunks of
    rows (memory chunk x N)."""
    image_nd = F.normalize(image_nd.float(), dim=-1)
    text_nd = F.normalize(text_nd.float(), dim=-1)
    n = image_nd.shape[0]
    total = 0.0
    for rows in _chunks(n, chunk):
        target = torch.arange(rows.start, rows.stop)
        i2t = scale * image_nd[rows] @ text_nd.T
        t2i = scale * text_nd[rows] @ image_nd.T
        ce = F.cross_entropy(i2t, target, reduction="sum") + F.cross_entropy(
            t2i, target, reduction="sum"
        )
        total += 0.5 * float(ce)
    return total / n if n else math.nan


def _distinct(captions: list[str]) -> tuple[list[int], torch.Tensor]:
    """(row of the first occurrence of each distinct caption, caption id of each row)."""
    first: dict[str, int] = {}
    ids = [first.setdefault(c, len(first)) for c in captions]
    rows = [0] * len(first)
    for row in reversed(range(len(captions))):
        rows[ids[row]] = row
    return rows, torch.tensor(ids)


@torch.no_grad()
def retrieval_metrics(
    image_nd: torch.Tensor, text_nd: torch.Tensor, captions: list[str], chunk: int = 1024
) -> dict[str, float]:
    """Recall@1 and @5 of image->text and text->image retrieval, as shares of the N rows.

    Captions are compared as strings: rows with the same caption (a data set's captions
    repeat, "a photo of the digit seven") share one candidate, embedded by its first row.
    - image->text: each image ranks the C distinct captions; a hit at k when its own
      caption is among the top k.
    - text->image: each row's caption ranks all N images; a hit at k when one of the top k
      images has that caption (any image paired with it is a right answer).
    Ties count against the model (a wrong candidate scoring equal to the best right one
    ranks above it), so a collapsed model that embeds everything alike scores 0, not 1.
    """
    image_nd = F.normalize(image_nd.float(), dim=-1)
    text_nd = F.normalize(text_nd.float(), dim=-1)
    first_rows, caption_n = _distinct(captions)
    caption_cd = text_nd[first_rows]
    i2t_rank, t2i_rank = [], []
    for rows in _chunks(image_nd.shape[0], chunk):
        own_r = caption_n[rows]
        # image -> text: wrong captions scoring >= the right one
        sim_rc = image_nd[rows] @ caption_cd.T
        right_r = sim_rc.gather(1, own_r[:, None])
        wrong_rc = torch.ones_like(sim_rc, dtype=torch.bool)
        wrong_rc[torch.arange(own_r.shape[0]), own_r] = False
        i2t_rank.append(((sim_rc >= right_r) & wrong_rc).sum(1))
        # text -> image: images of other captions scoring >= the best image of this one
        sim_rn = caption_cd[own_r] @ image_nd.T
        right_rn = caption_n[None, :] == own_r[:, None]
        best_r = sim_rn.masked_fill(~right_rn, -math.inf).amax(1, keepdim=True)
        t2i_rank.append(((sim_rn >= best_r) & ~right_rn).sum(1))
    if not i2t_rank:
        return {f"eval_{n}_r{k}": math.nan for n in ("i2t", "t2i") for k in (1, 5)}
    i2t, t2i = torch.cat(i2t_rank), torch.cat(t2i_rank)
    return {
        f"eval_{name}_r{k}": float((rank < k).float().mean())
        for name, rank in (("i2t", i2t), ("t2i", t2i))
        for k in (1, 5)
    }


@torch.no_grad()
def zero_shot_accuracy(
    image_nd: torch.Tensor, prompt_kd: torch.Tensor, labels_n: torch.Tensor
) -> float | None:
    """Share of the labelled rows (label >= 0) whose image is closest (cosine) to the
    prompt of its own class; None when no row is labelled."""
    labelled = labels_n >= 0
    if not bool(labelled.any()):
        return None
    image_nd = F.normalize(image_nd[labelled].float(), dim=-1)
    prompt_kd = F.normalize(prompt_kd.float(), dim=-1)
    predicted = (image_nd @ prompt_kd.T).argmax(1)
    return float((predicted == labels_n[labelled]).float().mean())


def metrics_of(
    image_nd: torch.Tensor,
    text_nd: torch.Tensor,
    captions: list[str],
    scale: float,
    prompt_kd: torch.Tensor | None = None,
    labels_n: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Every evaluation number of task contrastive from the eval set's embeddings:
    eval_loss, the four recalls and, given class prompts and labels, eval_zero_shot_accuracy."""
    out: dict[str, Any] = {"eval_loss": contrastive_eval_loss(image_nd, text_nd, scale)}
    out.update(retrieval_metrics(image_nd, text_nd, captions))
    if prompt_kd is not None and labels_n is not None and prompt_kd.shape[0] > 0:
        acc = zero_shot_accuracy(image_nd, prompt_kd, labels_n)
        if acc is not None:
            out["eval_zero_shot_accuracy"] = acc
    return out
