"""Pruning and GGUF writing on tiny models made in code (no training run).

The GGUF file is read back with gguf's own GGUFReader and compared with the weights it
came from; the Q/K permutation is checked against the rotary embedding llama.cpp
applies (adjacent pairs), not against its own inverse alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bigft.errors import BigftError
from bigft.model.gguf_export import check_gguf_model, permute, unpermute, write_gguf
from bigft.model.prune import check_pruning, prunable_layers, prune_model
from bigft.tiny import (
    SPECIAL_TOKENS,
    build_char_tokenizer,
    build_tiny_llama,
    save_tiny_base,
    wrap_tokenizer,
)

gguf = pytest.importorskip("gguf")

HEADS, KV_HEADS, LAYERS = 4, 2, 2
BLOCK_TENSORS = {  # llama.cpp's names -> transformers' (the brief's list, written out)
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def expected_names() -> dict[str, str]:
    names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    for i in range(LAYERS):
        for ours, theirs in BLOCK_TENSORS.items():
            names[f"blk.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hidden 64 (head dim 16), GQA 4/2 heads, 2 layers, char tokenizer of 100 tokens."""
    return save_tiny_base(tmp_path_factory.mktemp("base"), num_layers=LAYERS)


def read_gguf(path: Path) -> tuple[Any, dict[str, Any]]:
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def field(reader: Any, key: str) -> Any:
    return reader.fields[key].contents()


def undo(name: str, array: np.ndarray) -> torch.Tensor:
    """A GGUF matrix back in transformers' row order."""
    tensor = torch.from_numpy(np.array(array, dtype=np.float32))
    if ".attn_q." in name:
        return unpermute(tensor, HEADS, HEADS)
    if ".attn_k." in name:
        return unpermute(tensor, HEADS, KV_HEADS)
    return tensor


def test_q8_0_file_holds_every_tensor_within_q8_0_error(base: Path, tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    facts = write_gguf(base, path, "q8_0", "tiny")
    weights = load_file(base / "model.safetensors")
    _, tensors = read_gguf(path)
    names = expected_names()
    assert set(tensors) == set(names)
    assert facts["parameters"] == sum(w.numel() for w in weights.values())
    for name, key in names.items():
        original, stored = weights[key].float(), tensors[name]
        # GGUF lists dimensions innermost first
        assert list(stored.shape) == list(reversed(original.shape)), name
        if original.ndim == 1:
            assert stored.tensor_type == gguf.GGMLQuantizationType.F32
            assert torch.equal(torch.from_numpy(np.array(stored.data)), original), name
            continue
        assert stored.tensor_type == gguf.GGMLQuantizationType.Q8_0, name
        back = undo(name, gguf.quants.dequantize(stored.data, stored.tensor_type))
        assert back.shape == original.shape
        # q8_0: blocks of 32 values, scale d = max|x| / 127 stored in fp16, values rounded
        # to the nearest multiple of d: error at most d/2 plus the fp16 rounding of d.
        blocks = original.reshape(-1, 32)
        bound = blocks.abs().amax(dim=1, keepdim=True) / 127 * (0.5 + 127 * 2**-11) + 1e-7
        err = (back.reshape(-1, 32) - blocks).abs()
        assert (err <= bound).all(), (name, float((err - bound).max()))
        assert float(err.max()) > 0  # really quantized, not copied


def test_f16_file_holds_the_f16_weights_exactly(base: Path, tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_gguf(base, path, "f16", "tiny")
    weights = load_file(base / "model.safetensors")
    reader, tensors = read_gguf(path)
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    for name, key in expected_names().items():
        original, stored = weights[key], tensors[name]
        if original.ndim == 1:
            continue
        assert stored.tensor_type == gguf.GGMLQuantizationType.F16, name
        back = undo(name, np.array(stored.data)).to(torch.float16)
        assert torch.equal(back, original.to(torch.float16)), name


def test_hparams_and_tokenizer_metadata(base: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = tmp_path / "m.gguf"
    write_gguf(base, path, "q8_0", "tiny")
    reader, _ = read_gguf(path)
    config = json.loads((base / "config.json").read_text())
    expected = {
        "general.architecture": "llama",
        "general.name": "tiny",
        "general.file_type": gguf.LlamaFileType.MOSTLY_Q8_0,
        "llama.context_length": config["max_position_embeddings"],
        "llama.embedding_length": 64,
        "llama.block_count": LAYERS,
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.attention.head_count": HEADS,
        "llama.attention.head_count_kv": KV_HEADS,
        "llama.rope.dimension_count": 16,
        "llama.rope.freq_base": 10000.0,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
    }
    for key, value in expected.items():
        assert field(reader, key) == value, key
    eps = field(reader, "llama.attention.layer_norm_rms_epsilon")
    assert eps == pytest.approx(config["rms_norm_eps"], rel=1e-6)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[:4] == [gguf.TokenType.CONTROL] * 4  # pad, bos, eos, unk
    assert set(types[4:]) == {gguf.TokenType.NORMAL}


def test_sentencepiece_style_vocabulary_is_written_as_llama(tmp_path: Path) -> None:
    """A byte-fallback BPE tokenizer.json (Llama 2's kind) becomes tokenizer.ggml.model
    'llama' with scores and BYTE token types; unused embedding rows are padded."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    for piece in ["▁", "a", "b", "▁a", "ab"]:
        vocab[piece] = len(vocab)
    backend = Tokenizer(
        models.BPE(vocab, [("▁", "a"), ("a", "b")], byte_fallback=True, unk_token="<unk>")
    )
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer = wrap_tokenizer(backend)
    model_dir = tmp_path / "model"
    model = build_tiny_llama(vocab_size=len(tokenizer) + 6, hidden_size=32, num_layers=1)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    write_gguf(model_dir, tmp_path / "m.gguf", "q8_0", "spm")
    reader, _ = read_gguf(tmp_path / "m.gguf")
    assert field(reader, "tokenizer.ggml.model") == "llama"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == len(tokenizer) + 6 and tokens[-1] == f"[PAD{len(tokens) - 1}]"
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[4 + 0x41] == gguf.TokenType.BYTE and tokens[4 + 0x41] == "<0x41>"
    assert len(field(reader, "tokenizer.ggml.scores")) == len(tokens)


@pytest.mark.parametrize("kind", ["llama3", "gpt2", "other"])
def test_byte_level_pre_tokenizers_llama_cpp_implements_are_named(
    base: Path, tmp_path: Path, kind: str
) -> None:
    """Llama 3's split regex is llama.cpp's `llama-bpe`, ByteLevel's own regex `gpt-2`;
    any other is left unnamed (llama.cpp warns and uses its default)."""
    from tokenizers import Regex, pre_tokenizers

    # Meta's Llama 3 tokenizer pattern (tiktoken pat_str), as its tokenizer.json holds it
    llama3_split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
        r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tokenizer = build_char_tokenizer()
    backend = tokenizer.backend_tokenizer
    if kind == "llama3":
        split = pre_tokenizers.Split(Regex(llama3_split), behavior="isolated")
        steps = [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    elif kind == "gpt2":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
    model_dir = tmp_path / "model"
    shutil.copytree(base, model_dir)
    wrap_tokenizer(backend).save_pretrained(model_dir)
    write_gguf(model_dir, tmp_path / "m.gguf", "f16", "pre")
    reader, _ = read_gguf(tmp_path / "m.gguf")
    expected = {"llama3": "llama-bpe", "gpt2": "gpt-2"}.get(kind)
    if expected is None:
        assert "tokenizer.ggml.pre" not in reader.fields
    else:
        assert field(reader, "tokenizer.ggml.pre") == expected


def test_permutation_gives_llama_cpp_rope_the_same_attention_scores() -> None:
    """transformers rotates the two halves of each head (rotate_half); llama.cpp's llama
    rope rotates adjacent pairs. With Q and K rows permuted, llama.cpp's rope yields the
    attention scores transformers computes from the original weights."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS)
    dim, seq = 16, 7
    x = torch.randn(seq, 64)
    wq, wk = torch.randn(HEADS * dim, 64), torch.randn(KV_HEADS * dim, 64)
    pos = torch.arange(seq)[None]

    def heads(y: torch.Tensor, n: int) -> torch.Tensor:
        return y.reshape(seq, n, dim).transpose(0, 1)[None]  # [1, n, seq, dim]

    cos, sin = LlamaRotaryEmbedding(config)(x[None], pos)
    q_hf, k_hf = apply_rotary_pos_emb(heads(x @ wq.T, HEADS), heads(x @ wk.T, KV_HEADS), cos, sin)

    def pairwise_rope(y: torch.Tensor) -> torch.Tensor:  # ggml rope, mode 0 (llama)
        theta = pos[0, :, None] * 10000.0 ** (-torch.arange(0, dim, 2) / dim)
        even, odd = y[..., 0::2], y[..., 1::2]
        c, s = torch.cos(theta), torch.sin(theta)
        return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2)

    q_cpp = pairwise_rope(heads(x @ permute(wq, HEADS, HEADS).T, HEADS))
    k_cpp = pairwise_rope(heads(x @ permute(wk, HEADS, KV_HEADS).T, KV_HEADS))
    group = HEADS // KV_HEADS
    scores_hf = q_hf @ k_hf.repeat_interleave(group, dim=1).transpose(-1, -2)
    scores_cpp = q_cpp @ k_cpp.repeat_interleave(group, dim=1).transpose(-1, -2)
    torch.testing.assert_close(scores_cpp, scores_hf, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(permute(wq, HEADS, HEADS), wq)
    assert torch.equal(unpermute(permute(wk, HEADS, KV_HEADS), HEADS, KV_HEADS), wk)


def test_llama3_rope_writes_the_frequency_divisors(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}
    rope |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 5e5}
    config = LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        rope_parameters=rope,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    build_char_tokenizer().save_pretrained(tmp_path / "m")
    write_gguf(tmp_path / "m", tmp_path / "m.gguf", "f16", "l3")
    reader, tensors = read_gguf(tmp_path / "m.gguf")
    factors = torch.from_numpy(np.array(tensors["rope_freqs.weight"].data))
    assert factors.shape == (16,) and factors.min() == 1.0 and factors.max() == 8.0
    llama3, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    plain = 1.0 / 5e5 ** (torch.arange(0, 32, 2).float() / 32)
    torch.testing.assert_close(plain / factors, llama3)  # what llama.cpp computes
    assert field(reader, "llama.rope.freq_base") == 5e5


@pytest.mark.parametrize(
    ("config", "task", "says"),
    [
        ({"model_type": "gpt2"}, "causal_lm", "not gpt2: use int8, nf4"),
        ({"model_type": "qwen2"}, "causal_lm", "not qwen2"),
        ({"model_type": "llama"}, "classification", "task is classification: use int8, nf4"),
        ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn"}}, "causal_lm", "yarn"),
    ],
)
def test_models_llama_cpp_would_not_run_are_refused(
    config: dict[str, Any], task: str, says: str
) -> None:
    with pytest.raises(BigftError, match=says) as info:
        check_gguf_model(config, task)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("sparsity", "pattern", "says"),
    [
        (0.3, "2:4", "exactly 0.5"),
        (0.0, "unstructured", "fraction"),
        (1.0, "unstructured", "fraction"),
        (0.5, "4:8", "unknown"),
    ],
)
def test_pruning_arguments_are_checked(sparsity: float, pattern: str, says: str) -> None:
    with pytest.raises(BigftError, match=says):
        check_pruning(sparsity, pattern)


def test_unstructured_pruning_zeroes_the_smallest_half_of_each_block_layer() -> None:
    model = build_tiny_llama(vocab_size=100, num_layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    facts = prune_model(model, 0.5, "unstructured")
    layers = prunable_layers(model)
    assert {n for n, _, _ in layers} == {f"model.layers.{i}.{t}" for i in range(2) for t in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}  # fmt: skip
    for name, module, _ in layers:
        weight, original = module.weight, before[f"{name}.weight"]
        assert int((weight == 0).sum()) == round(0.5 * weight.numel())
        kept = original.abs()[weight != 0]
        assert kept.min() >= original.abs()[weight == 0].max()  # the smallest went
        assert torch.equal(weight[weight != 0], original[weight != 0])
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(model.state_dict()[key], before[key]), key
    sparse = facts["sparsity"]
    assert sparse["pruned_layers_sparsity"] == 0.5
    zeros_elsewhere = int((before["model.embed_tokens.weight"] == 0).sum())  # the pad row
    assert zeros_elsewhere == 64
    assert sparse["all_zeros"] == sparse["pruned_layer_zeros"] + zeros_elsewhere
    total = sum(v.numel() for v in before.values())
    assert sparse["overall_sparsity"] == pytest.approx(sparse["all_zeros"] / total)
    assert not any(hasattr(m, "weight_orig") for _, m, _ in layers)  # made permanent


def test_two_of_four_keeps_the_two_largest_of_every_four_inputs() -> None:
    model = build_tiny_llama(vocab_size=100, num_layers=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune_model(model, 0.5, "2:4")
    for name, module, _ in prunable_layers(model):
        groups = module.weight.reshape(-1, 4)
        original = before[f"{name}.weight"].reshape(-1, 4)
        assert ((groups == 0).sum(dim=1) >= 2).all(), name
        top2 = original.abs().topk(2, dim=1).indices
        assert torch.equal(groups.gather(1, top2), original.gather(1, top2)), name


def test_heads_and_embeddings_of_other_models_are_left_whole() -> None:
    """A ViT classifier and a GPT-2 (Conv1D layers, stored [in, out]) are pruned the same
    way: only the blocks, 2:4 along each output's inputs."""
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

    vit = ViTForImageClassification(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64, image_size=16, patch_size=8, num_labels=3)
    )  # fmt: skip
    names = {n for n, _, _ in prunable_layers(vit)}
    # q, k, v, attention output, two MLP layers of the one block; not the classifier
    assert len(names) == 6 and all(n.startswith("vit.") for n in names), names
    head = vit.classifier.weight.clone()
    prune_model(vit, 0.5, "unstructured")
    assert torch.equal(vit.classifier.weight, head)

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    layers = prunable_layers(gpt2)
    assert {dim for _, _, dim in layers} == {0}
    prune_model(gpt2, 0.5, "2:4")
    for name, module, _ in layers:
        groups = module.weight.T.reshape(-1, 4)  # [out, in] in groups of 4 inputs
        assert ((groups == 0).sum(dim=1) >= 2).all(), name
