"""A Llama-family causal LM as one GGUF file, the format llama.cpp and its tools read.

This follows llama.cpp's own `convert_hf_to_gguf.py` for the `llama` architecture (which
it also uses for Mistral): the hyperparameters llama.cpp reads, tensor names from
gguf's TENSOR_NAMES tables, and the Q/K row permutation. transformers keeps the two
rotary halves of each head apart (rotate_half); llama.cpp's `llama` rope pairs adjacent
dimensions, so the rows of q_proj / k_proj are interleaved per head (`permute`).

q8_0 stores every matrix whose rows are a multiple of 32 values in blocks of 32 int8
values with one fp16 scale (other matrices f16); f16 stores matrices in fp16. Vectors
(norms) stay fp32 in both, as llama.cpp's converter writes them.

Weights are read from the safetensors files one tensor at a time and written as they
are converted: memory holds one tensor, not the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigft.errors import BigftError, require

log = logging.getLogger(__name__)

GGUF_ARCHS = ("llama", "mistral")  # model_type values written as llama.cpp's `llama`
GGUF_TYPES = ("q8_0", "f16")


def permute(weight: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """q_proj / k_proj rows in llama.cpp's rope order (convert_hf_to_gguf LlamaModel.permute):
    within each head, [first half | second half] becomes interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def unpermute(weight: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """The inverse of `permute`: transformers' row order back."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def check_gguf_model(config: dict[str, Any], task: str) -> None:
    """Refuse, before any work, a model llama.cpp's `llama` architecture would not run."""
    formats = "int8, nf4 or a pruned export (bigft prune)"
    if task != "causal_lm":
        raise BigftError(
            f"--quantize gguf:* writes causal LMs for llama.cpp; this run's task is {task}: "
            f"use {formats}"
        )
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCHS:
        raise BigftError(
            f"--quantize gguf:* supports model_type {' and '.join(GGUF_ARCHS)}, not "
            f"{model_type}: use {formats}, or llama.cpp's convert_hf_to_gguf.py"
        )
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") not in ("default", "linear", "llama3"):
        raise BigftError(
            f"--quantize gguf:*: rope type {rope['rope_type']} is not written by bigft "
            "(default, linear and llama3 are); use llama.cpp's convert_hf_to_gguf.py"
        )


def write_gguf(model_dir: Path, path: Path, qtype: str, name: str) -> dict[str, int]:
    """Write the model in `model_dir` (config.json, safetensors, tokenizer files) to the
    GGUF file `path` with matrices in `qtype` (q8_0 or f16), named `name` in its
    metadata. Returns the tensor and parameter counts written."""
    require("gguf", "gguf", "--quantize gguf:*")
    import gguf

    config = json.loads((model_dir / "config.json").read_text())
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))
    types = gguf.GGMLQuantizationType
    matrices = {"q8_0": types.Q8_0, "f16": types.F16}[qtype]

    def stored_as(shape: tuple[int, ...]) -> Any:
        """Vectors fp32; matrices q8_0 when each row is whole 32-value blocks, else f16."""
        if len(shape) < 2:
            return types.F32
        return types.F16 if matrices == types.F16 or shape[-1] % 32 else matrices

    def gguf_name(key: str) -> str:
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise BigftError(f"{model_dir}: no GGUF name for the tensor {key} (llama layout)")
        return str(name)

    def encoded(key: str, tensor: torch.Tensor) -> np.ndarray:
        if key.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = permute(tensor, n_head, n_head)
        elif key.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = permute(tensor, n_head, n_kv)
        array = tensor.float().numpy()
        kind = stored_as(tuple(array.shape))
        if kind == types.F32:
            return array.astype(np.float32)
        if kind == types.F16:
            return array.astype(np.float16)
        return gguf.quants.quantize(array, kind)

    factors = _rope_factors(config)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name)
    _hparams(writer, config, qtype)
    _vocabulary(writer, model_dir, int(config["vocab_size"]))
    shapes = [(gguf_name(key), shape) for key, shape in _shapes(model_dir, config)]
    if factors is not None:
        shapes.append(("rope_freqs.weight", factors.shape))
    for name, shape in shapes:  # the header first: names, types and sizes
        kind = stored_as(shape) if name != "rope_freqs.weight" else types.F32
        stored = gguf.quants.quant_shape_to_byte_shape(shape, kind)
        writer.add_tensor_info(name, stored, np.dtype(np.uint8), int(np.prod(stored)), kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    parameters = 0
    for key, tensor in _tensors(model_dir, config):  # the same order as the header
        writer.write_tensor_data(encoded(key, tensor))
        parameters += tensor.numel()
    if factors is not None:
        writer.write_tensor_data(factors)
    writer.close()
    return {"tensors": len(shapes), "parameters": parameters}


def _tensors(model_dir: Path, config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors in file order, read one at a time."""
    from safetensors import safe_open

    for file, keys in _weight_keys(model_dir, config):
        with safe_open(str(file), framework="pt") as handle:
            for key in keys:
                yield key, handle.get_tensor(key)


def _shapes(model_dir: Path, config: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """The shapes `_tensors` will yield, read from the file headers only."""
    from safetensors import safe_open

    for file, keys in _weight_keys(model_dir, config):
        with safe_open(str(file), framework="pt") as handle:
            for key in keys:
                yield key, tuple(handle.get_slice(key).get_shape())


def _weight_keys(model_dir: Path, config: dict[str, Any]) -> list[tuple[Path, list[str]]]:
    """(file, tensor names) of every safetensors file; a tied lm_head is left out (llama.cpp
    uses token_embd when output.weight is absent)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise BigftError(f"{model_dir}: no safetensors weights to write to GGUF")
    tied = bool(config.get("tie_word_embeddings", False))
    found = []
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            names = handle.keys()
            keys = sorted(k for k in names if not (tied and k == "lm_head.weight"))
        found.append((file, keys))
    return found


def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def _rope_factors(config: dict[str, Any]) -> np.ndarray | None:
    """llama3 rope: the per-frequency divisors llama.cpp reads from `rope_freqs.weight`,
    taken from transformers' own llama3 frequencies (default / llama3)."""
    if _rope_parameters(config).get("rope_type") != "llama3":
        return None
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = AutoConfig.for_model(**config)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf)
    rope = _rope_parameters(config)
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    exponents = torch.arange(0, dim, 2, dtype=torch.float) / dim
    plain = 1.0 / (float(rope["rope_theta"]) ** exponents)
    return (plain / scaled).float().numpy()


def _hparams(writer: Any, config: dict[str, Any], qtype: str) -> None:
    """The `llama.*` keys llama.cpp reads (convert_hf_to_gguf TextModel + LlamaModel)."""
    import gguf

    n_head = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // n_head)
    rope = _rope_parameters(config)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or n_head))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != int(config["hidden_size"]) // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_vocab_size(int(config["vocab_size"]))
    file_type = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f16": gguf.LlamaFileType.MOSTLY_F16}
    writer.add_file_type(file_type[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _vocabulary(writer: Any, model_dir: Path, vocab_size: int) -> None:
    """tokenizer.ggml.*: SentencePiece-style vocabularies (a tokenizer.model, or a
    byte-fallback BPE tokenizer.json like Llama 2's) as `llama` with scores; any other
    as `gpt2` with token types and merges. Special token ids from the tokenizer files."""
    import gguf
    from gguf.vocab import LlamaHfVocab, SentencePieceVocab, SpecialVocab

    vocab: Any = None
    if (model_dir / "tokenizer.model").is_file():
        try:
            vocab = SentencePieceVocab(model_dir)
        except (ImportError, FileNotFoundError, RuntimeError):
            vocab = None  # no sentencepiece package: tokenizer.json below
    if vocab is None:
        try:
            vocab = LlamaHfVocab(model_dir)
        except (FileNotFoundError, TypeError, KeyError):
            vocab = None
    if vocab is not None:
        tokens, scores, types = zip(*vocab.all_tokens(), strict=True)
        model, tokens_list, scores_list = "llama", list(tokens), list(scores)
        types_list = [int(t) for t in types]
    else:
        model, scores_list = "gpt2", []
        tokens_list, types_list = _bpe_tokens(model_dir)
    if len(tokens_list) > vocab_size:
        raise BigftError(
            f"{model_dir}: the tokenizer has {len(tokens_list)} tokens, more than the "
            f"model's vocab_size {vocab_size}"
        )
    for i in range(len(tokens_list), vocab_size):  # embedding rows no token uses
        tokens_list.append(f"[PAD{i}]".encode())
        types_list.append(int(gguf.TokenType.UNUSED))
        scores_list += [-1000.0] if model == "llama" else []
    writer.add_tokenizer_model(model)
    pre = _pre_tokenizer(model_dir) if model == "gpt2" else None
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens_list)
    writer.add_token_types(types_list)
    if scores_list:
        writer.add_token_scores(scores_list)
    SpecialVocab(model_dir, load_merges=model == "gpt2", n_vocab=vocab_size).add_to_gguf(
        writer, quiet=True
    )


def _bpe_tokens(model_dir: Path) -> tuple[list[bytes], list[int]]:
    """Tokens in id order and their GGUF types, as convert_hf_to_gguf's get_vocab_base:
    added special tokens CONTROL, other added tokens USER_DEFINED, the rest NORMAL."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens: list[bytes] = []
    types: list[int] = []
    for i in range(max(by_id) + 1):
        if i not in by_id:
            tokens.append(f"[PAD{i}]".encode())
            types.append(int(gguf.TokenType.UNUSED))
            continue
        tokens.append(by_id[i].encode("utf-8"))
        if i in added:
            kind = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
        else:
            kind = gguf.TokenType.NORMAL
        types.append(int(kind))
    return tokens, types


# The Split regex of Llama 3's tokenizer.json, which llama.cpp implements as `llama-bpe`.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(model_dir: Path) -> str | None:
    """llama.cpp's name for a byte-level BPE pre-tokenizer it implements: `llama-bpe`
    (Llama 3's split regex) or `gpt-2` (ByteLevel's own regex). Others are not named:
    llama.cpp then uses its default and warns when it loads the file."""
    try:
        pre = json.loads((model_dir / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    except (OSError, ValueError):
        return None
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    split = steps[0].get("pattern", {}).get("Regex") if kinds == ["Split", "ByteLevel"] else None
    if split == LLAMA3_SPLIT and not steps[1].get("use_regex", True):
        return "llama-bpe"
    return None
