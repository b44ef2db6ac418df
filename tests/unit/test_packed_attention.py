"""Packed micro-batches of several rows stay isolated per sequence under every attention
implementation: sdpa/eager through the mask transformers builds from position_ids, and
flash-attention through its varlen path, which transformers takes only for one row.

flash-attn needs CUDA, so its side is checked with transformers' own decision logic on
the exact batch bigft hands the model, and with a probe attention registered under a new
name that does what flash-attention does: varlen attention when transformers recognises a
packed batch, plain causal attention over the whole row otherwise.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
from transformers.modeling_flash_attention_utils import (
    _is_packed_sequence,
    prepare_fa_kwargs_from_position_ids,
)

from bigft.config import Config
from bigft.data.labeled import make_collator
from bigft.data.packing import needs_flat_packing, pack
from bigft.losses import logits_and_labels
from bigft.model.attention import attention_implementation

PROBE = "bigft_varlen_probe"  # no "flash" in the name: transformers would import kernels
SEQ_LEN = 40


def flash_like_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """flash_attention_2's control flow on CPU: varlen iff `_is_packed_sequence`."""
    batch, heads = query.shape[:2]
    key = key.repeat_interleave(heads // key.shape[1], dim=1)
    value = value.repeat_interleave(heads // value.shape[1], dim=1)
    position_ids = kwargs.get("position_ids")
    if _is_packed_sequence(position_ids, batch):
        (cu_seqlens, _), _ = prepare_fa_kwargs_from_position_ids(position_ids)
        out = torch.zeros_like(query)
        for lo, hi in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
            out[:, :, lo:hi] = F.scaled_dot_product_attention(
                query[:, :, lo:hi],
                key[:, :, lo:hi],
                value[:, :, lo:hi],
                is_causal=True,
                scale=scaling,
            )
    else:  # what flash does with a [B >= 2, L] packed batch: causal over every boundary
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(PROBE, flash_like_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(PROBE, flash_attention_mask)


def _rows(tokenizer: Any) -> list[dict[str, list[int]]]:
    texts = [
        "abc def",
        "hello world!",
        "xy",
        "a longer sentence here",
        "qq",
        "packing",
        "zz top",
        "the quick brown fox",
        "jumps over",
        "the lazy dog, twice",
        "ok",
    ]
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": ids, "labels": [-100, *ids[1:]]})
    return rows


def _cfg(tiny_base: Path) -> Config:
    return Config.model_validate(
        {
            "model": {"name_or_path": str(tiny_base)},
            "data": {"format": "text", "train": "unused.jsonl", "packing": True},
            "output_dir": "unused",
        }
    )


def _model(tiny_base: Path, attn: str) -> Any:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation=attn)
    return model.eval()


def _per_sequence_logits(model: Any, rows: list[dict[str, list[int]]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([r["input_ids"]]), use_cache=False).logits[0] for r in rows]


def _packed_batch(tiny_base: Path, tokenizer: Any, attn: str, micro_batch: int) -> Any:
    rows = _rows(tokenizer)
    packed = pack(rows, SEQ_LEN, seed=0, pad_token_id=tokenizer.pad_token_id)
    assert len(packed) >= micro_batch  # several packed rows in one micro-batch
    collate = make_collator(_cfg(tiny_base), tokenizer, attn)
    return rows, packed, collate([packed[i] for i in range(micro_batch)])


def _check_isolated(
    model: Any, rows: list[dict[str, list[int]]], packed: Any, batch: dict[str, torch.Tensor]
) -> int:
    """Every packed sequence's logits equal its logits when run alone; returns how many
    sequences were compared."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    flat_logits = logits.logits.reshape(-1, logits.logits.size(-1))
    flat_ids = batch["input_ids"].reshape(-1).tolist()
    flat_pos = batch["position_ids"].reshape(-1).tolist()
    alone = {
        tuple(r["input_ids"]): out
        for r, out in zip(rows, _per_sequence_logits(model, rows), strict=True)
    }
    compared, start = 0, 0
    for i in range(1, len(flat_pos) + 1):
        if i == len(flat_pos) or flat_pos[i] == 0:
            ids = tuple(flat_ids[start:i])
            if ids in alone:
                torch.testing.assert_close(flat_logits[start:i], alone[ids], atol=1e-5, rtol=1e-5)
                compared += 1
            start = i
    return compared


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_masked_attention_keeps_rows_and_isolates_them(tiny_base, tokenizer, attn) -> None:
    """sdpa / eager: a [B=3, L] packed micro-batch is handed over as is and isolated."""
    model = _model(tiny_base, attn)
    assert attention_implementation(model) == attn and not needs_flat_packing(attn)
    rows, packed, batch = _packed_batch(tiny_base, tokenizer, attn, micro_batch=3)
    assert batch["input_ids"].shape == (3, SEQ_LEN)
    assert _check_isolated(model, rows, packed, batch) >= 4


def test_flash_batches_are_recognised_as_packed_by_transformers(tiny_base, tokenizer) -> None:
    """flash_attention_2: bigft hands the model one row whose position_ids transformers'
    flash path turns into the right cu_seqlens (one entry per packed sequence)."""
    _, packed, batch = _packed_batch(tiny_base, tokenizer, "flash_attention_2", micro_batch=2)
    assert batch["input_ids"].shape == (1, 2 * SEQ_LEN)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no mask: varlen from posids
    assert _is_packed_sequence(batch["position_ids"], batch["input_ids"].shape[0])
    (cu_seqlens, _), (max_len, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    pos = batch["position_ids"][0]
    starts = [i for i in range(pos.numel()) if pos[i] == 0] + [pos.numel()]
    assert cu_seqlens.tolist() == starts
    assert max_len == max(b - a for a, b in itertools.pairwise(starts))
    # The rows of the micro-batch were laid end to end, nothing else changed.
    assert batch["input_ids"].reshape(2, SEQ_LEN).tolist() == [
        packed[0]["input_ids"],
        packed[1]["input_ids"],
    ]


def test_flash_like_attention_is_isolated_on_bigfts_batch(tiny_base, tokenizer) -> None:
    """With flash-attention's control flow, bigft's packed batch gives per-sequence logits;
    the same rows as a [B=2, L] batch do not (what transformers does with them)."""
    model = _model(tiny_base, PROBE)
    assert needs_flat_packing(attention_implementation(model))
    rows, packed, batch = _packed_batch(tiny_base, tokenizer, PROBE, micro_batch=2)
    assert _check_isolated(model, rows, packed, batch) >= 3

    unflattened = {k: v.reshape(2, SEQ_LEN) for k, v in batch.items()}
    with pytest.raises(AssertionError):
        _check_isolated(model, rows, packed, unflattened)


def test_flattened_loss_equals_row_loss(tiny_base, tokenizer) -> None:
    """The loss path gives the same summed loss and targets for both shapes (sdpa)."""
    model = _model(tiny_base, "sdpa")
    _, _, rows_batch = _packed_batch(tiny_base, tokenizer, "sdpa", micro_batch=3)
    flat = {k: v.reshape(1, -1) for k, v in rows_batch.items()}
    sums = []
    for batch in (rows_batch, flat):
        logits, labels = logits_and_labels(model, batch)
        sums.append(
            F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="sum"
            )
        )
    torch.testing.assert_close(sums[0], sums[1], atol=1e-4, rtol=1e-5)
