"""The tiled MLP (bigft.model.tiled_mlp) against the untiled model.

Every comparison trains one step of two copies of a tiny fp32 model, one with its
decoder MLPs tiled, on packed rows (position_ids restarting at 0, micro-batch 3), and
checks the summed loss and every trainable parameter's gradient. INTER (the MLP's
intermediate size) is a dimension no other tensor has, so a dispatch probe can watch the
MLP's intermediates.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from bigft.config_io import load_config
from bigft.errors import BigftError, ConfigError
from bigft.losses import Batch, loss_sum
from bigft.model.tiled_mlp import apply_tiled_mlp
from tests.helpers import alive_probe

VOCAB, HIDDEN, INTER, B, L = 200, 32, 96, 3, 24
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": INTER,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
}


def llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**COMMON, num_key_value_heads=2)).float()


def qwen2() -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    return Qwen2ForCausalLM(Qwen2Config(**COMMON, num_key_value_heads=2)).float()


def gpt_neox() -> Any:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(2)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**COMMON)).float()


def lora_llama() -> Any:
    from peft import LoraConfig, get_peft_model

    # Random B as well as A (peft's default B is zero, which would hide A's gradient).
    lora = LoraConfig(
        r=4, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"], init_lora_weights=False
    )
    return get_peft_model(llama(), lora)


def packed(seed: int = 0) -> Batch:
    """Several sequences per row, position_ids restarting at 0, no attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, L), generator=g)
    position_ids = torch.zeros(B, L, dtype=torch.long)
    labels = ids.clone()
    for row, cuts in enumerate([(0, 9, 24), (0, 5, 13, 24), (0, 24)]):
        for start, end in itertools.pairwise(cuts):
            position_ids[row, start:end] = torch.arange(end - start)
            labels[row, start] = -100
    return {"input_ids": ids, "position_ids": position_ids, "labels": labels}


def step(model: Any, batch: Batch) -> torch.Tensor:
    model.train()
    loss, _ = loss_sum(model, batch)
    loss.backward()
    return loss.detach()


def assert_same_step(untiled: Any, tiled: Any, batch: Batch, rel: float = 1e-5) -> None:
    want, got = step(untiled, batch), step(tiled, batch)
    torch.testing.assert_close(got, want, rtol=rel, atol=0)
    grads = {n: p.grad for n, p in untiled.named_parameters() if p.requires_grad}
    tiled_grads = {n: p.grad for n, p in tiled.named_parameters() if p.requires_grad}
    assert grads.keys() == tiled_grads.keys() and grads
    for name, g in grads.items():
        scale = float(g.norm())
        assert scale > 0, f"{name}: no gradient reached it"
        assert float((tiled_grads[name] - g).norm()) <= rel * scale, name


class TileCounter:
    """Records the length of every MLP tile computed (forward and recomputation)."""

    def __init__(self, model: Any) -> None:
        self.lengths: list[int] = []
        for module in model.modules():
            tiler = getattr(module, "_bigft_tiled_mlp", None)
            if tiler is not None:
                tiler._forward = self._recorded(tiler._forward)

    def _recorded(self, inner: Any) -> Any:
        def forward(tile: torch.Tensor) -> Any:
            self.lengths.append(tile.size(1))
            return inner(tile)

        return forward


@pytest.mark.parametrize(
    ("build", "shards", "tile_lengths"),
    [
        (llama, None, [8, 8, 8]),  # ceil(3 x 24 tokens / hidden 32) = 3 tiles
        (llama, 5, [5, 5, 5, 5, 4]),
        (qwen2, 4, [6, 6, 6, 6]),
        (gpt_neox, 3, [8, 8, 8]),
        (lora_llama, 5, [5, 5, 5, 5, 4]),
        (llama, 100, [1] * L),  # more shards than positions: one position per tile
    ],
    ids=["llama-auto", "llama-5", "qwen2-4", "gpt-neox-3", "lora-llama-5", "shards>L"],
)
def test_loss_and_every_gradient_match_the_untiled_model(
    build: Any, shards: int | None, tile_lengths: list[int]
) -> None:
    untiled = build()
    tiled = copy.deepcopy(untiled)
    assert apply_tiled_mlp(tiled, shards) == 2
    counter = TileCounter(tiled)
    assert_same_step(untiled, tiled, packed())
    # Each layer's tiles run once in forward and once more (recomputed) in backward.
    assert sorted(counter.lengths) == sorted(tile_lengths * 2 * 2)


def test_inside_checkpointed_layers_and_over_two_micro_batches() -> None:
    untiled = lora_llama()
    tiled = copy.deepcopy(untiled)
    apply_tiled_mlp(tiled, 4)
    for model in (untiled, tiled):
        base = model.get_base_model()
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    for model in (untiled, tiled):  # gradients accumulate over two micro-batches
        step(model, packed(1))
    assert_same_step(untiled, tiled, packed(2))


def test_evaluation_without_grad_is_tiled_and_equal() -> None:
    untiled = llama().eval()
    tiled = copy.deepcopy(untiled)
    apply_tiled_mlp(tiled, 6)
    batch = packed()
    with torch.no_grad():
        torch.testing.assert_close(loss_sum(tiled, batch)[0], loss_sum(untiled, batch)[0])
        x = torch.randn(B, L, HIDDEN)
        mlp = tiled.model.layers[0].mlp
        torch.testing.assert_close(mlp(x), type(mlp).forward(mlp, x))


@pytest.mark.parametrize("shards", [None, 6, 1])
def test_one_tile_of_intermediates_alive_at_a_time(shards: int | None) -> None:
    model = lora_llama()
    if shards != 1:
        apply_tiled_mlp(model, shards)
    tile = L // (shards or 3)
    probe = alive_probe(lambda t: t.shape[1] if t.dim() == 3 and t.shape[-1] == INTER else None)
    with probe:
        step(model, packed())
    if shards == 1:
        # Untiled: both layers keep gate, act and up outputs (B x L x INTER each) until
        # their backward, so at least 6 full-length intermediates are alive at once.
        assert probe.largest == L and probe.peak >= 6 * L
    else:
        # The tile's gate, up, act, product and, in backward, their gradients: a few
        # tile-length tensors, whichever layer and direction, never a full-length one.
        assert probe.largest == tile
        assert probe.peak <= 8 * tile < 6 * L


def test_what_cannot_be_tiled_is_a_clear_error() -> None:
    with pytest.raises(BigftError, match="no decoder layers with a dense `mlp`"):
        apply_tiled_mlp(torch.nn.Sequential(torch.nn.Linear(2, 2)), None)
    with pytest.raises(ConfigError, match="tiled_mlp_shards must be >= 1"):
        apply_tiled_mlp(llama(), 0)
    model = llama()
    assert apply_tiled_mlp(model, 2) == apply_tiled_mlp(model, 3) == 2  # re-applied: re-set
    assert model.model.layers[1].mlp._bigft_tiled_mlp.shards == 3


def _config(tmp_path: Path, **method: Any) -> Path:
    path = tmp_path / "cfg.yaml"
    cfg = {
        "model": {"name_or_path": "llama-3.1-8b"},
        "data": {"train": "rows.jsonl"},
        "method": {"name": "lora", "gradient_checkpointing": "full", **method},
        "output_dir": str(tmp_path / "out"),
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_config_rejects_shards_without_tiled_mlp(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tiled_mlp_shards applies to tiled_mlp: true"):
        load_config(_config(tmp_path, tiled_mlp_shards=4))
    with pytest.raises(ConfigError, match="tiled_mlp_shards applies to tiled_mlp: true"):
        load_config(_config(tmp_path), ["method.tiled_mlp_shards=4"])
    cfg = load_config(_config(tmp_path), ["method.tiled_mlp=true", "method.tiled_mlp_shards=4"])
    assert (cfg.method.tiled_mlp, cfg.method.tiled_mlp_shards) == (True, 4)


def test_apply_method_tiles_when_configured(tmp_path: Path) -> None:
    from bigft.model.methods import apply_method

    cfg = load_config(_config(tmp_path, tiled_mlp=True, tiled_mlp_shards=3))
    cfg.train.precision = "fp32"
    model = apply_method(llama(), cfg)
    mlps = [layer.mlp for layer in model.get_base_model().model.layers]
    assert all(mlp._bigft_tiled_mlp.shards == 3 for mlp in mlps)
    plain = apply_method(llama(), load_config(_config(tmp_path)))
    assert not hasattr(plain.get_base_model().model.layers[0].mlp, "_bigft_tiled_mlp")
