"""Model architectures for planning: hyper-parameters from a config.json, no weights.

Shipped configs (`bigft/archs/*.json`) are copies of the published config.json of common
base models, so `bigft plan --model llama-3.1-8b` works offline. A local model directory
works too. Parameter counts come from the hyper-parameters for the decoder families the
planner knows (llama, mistral, qwen2, gemma2, phi3); any other `model_type` is built on the
meta device to count them. Nothing here imports torch unless that fallback is needed.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from bigft.errors import ConfigError

ARCH_DIR = Path(__file__).resolve().parent.parent / "archs"
# Decoder families whose parameter layout the analytic model knows exactly.
KNOWN_TYPES = {"llama", "mistral", "qwen2", "gemma2", "phi3"}
# Families whose transformers code refuses sdpa (attention logit soft-capping).
EAGER_ONLY = {"gemma2"}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ArchSpec:
    """The hyper-parameters that decide memory: widths, depth, heads, vocabulary."""

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    norms_per_layer: int = 2
    logit_softcap: float | None = None
    max_positions: int = 4096
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    counted_params: int | None = None  # from a meta-device build, for unknown families
    # A sequence-classification / regression head of this many outputs (transformers'
    # `score`, never tied) in place of the LM head; None: the causal LM.
    num_labels: int | None = None

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear in one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_linear_params(self) -> int:
        """Weights of the seven projections of one layer (what LoRA / 4-bit act on)."""
        return sum(a * b for a, b in self.linear_shapes().values())

    @property
    def layer_params(self) -> int:
        bias = self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0
        return self.layer_linear_params + bias + self.norms_per_layer * self.hidden

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_outputs(self) -> int:
        """Outputs of the head per position: the vocabulary, or a sequence head's labels."""
        return self.vocab if self.num_labels is None else self.num_labels

    @property
    def head_params(self) -> int:
        """lm_head weights (0 when tied to the embedding), or the sequence head's."""
        if self.num_labels is not None:
            return self.num_labels * self.hidden
        return 0 if self.tie_embeddings else self.vocab * self.hidden

    @property
    def n_params(self) -> int:
        if self.counted_params is not None:
            lm_head = 0 if self.tie_embeddings else self.vocab * self.hidden
            head = self.head_params if self.num_labels is not None else lm_head
            return self.counted_params - lm_head + head
        return self.embed_params + self.head_params + self.layers * self.layer_params + self.hidden

    def with_layers(self, layers: int) -> ArchSpec:
        """The same architecture at another depth (the simulator's shallow copies)."""
        cfg = dict(self.hf_config, num_hidden_layers=layers)
        for key in ("layer_types", "max_window_layers"):
            if isinstance(cfg.get(key), list):
                cfg[key] = cfg[key][:layers]
            elif key == "max_window_layers" and key in cfg:
                cfg[key] = layers
        return replace(self, layers=layers, hf_config=cfg, counted_params=None)


def shipped_archs() -> list[str]:
    """Names of the architecture configs that ship with bigft."""
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


def _normalize(name: str) -> str:
    """'meta-llama/Llama-3.1-8B' and 'Llama-3.1-8B' both become 'llama-3.1-8b'."""
    base = name.strip().rstrip("/").split("/")[-1].lower()
    for suffix in ("-hf", "-instruct", "-chat"):
        base = base.removesuffix(suffix)
    return base.replace("meta-llama-3", "llama-3").replace("_", "-")


@lru_cache(maxsize=64)
def _shipped_aliases() -> dict[str, str]:
    aliases: dict[str, str] = {}
    for stem in shipped_archs():
        aliases[stem] = stem
        data = json.loads((ARCH_DIR / f"{stem}.json").read_text())
        aliases[_normalize(data.get("_name_or_path", stem))] = stem
    aliases.setdefault("phi-3-mini", "phi-3-mini-4k")
    return aliases


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the model's config.json ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: config.json is not a JSON object")
    return data


def load_arch(name_or_path: str) -> ArchSpec:
    """An architecture by shipped name / hub id, or from a local model directory or file.

    Raises ConfigError with the nearest shipped names when nothing matches.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return arch_from_config(_read_config(path / "config.json"), name=path.name)
    if path.is_file() and path.suffix == ".json":
        return arch_from_config(_read_config(path), name=path.stem)
    key = _normalize(name_or_path)
    stem = _shipped_aliases().get(key)
    if stem is None:
        close = difflib.get_close_matches(key, list(_shipped_aliases()), n=3, cutoff=0.4)
        hint = f"; nearest: {', '.join(close)}" if close else ""
        raise ConfigError(
            f"model '{name_or_path}': not a local model directory nor a shipped architecture"
            f"{hint} (all: {', '.join(shipped_archs())})"
        )
    return arch_from_config(_read_config(ARCH_DIR / f"{stem}.json"), name=stem)


def arch_from_config(cfg: dict[str, Any], name: str = "model") -> ArchSpec:
    """ArchSpec from a transformers config.json dictionary."""
    if "text_config" in cfg and "hidden_size" not in cfg:  # multimodal wrappers
        cfg = {**cfg["text_config"], "_name_or_path": cfg.get("_name_or_path", name)}
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        spec = ArchSpec(
            name=name,
            model_type=str(cfg.get("model_type", "llama")),
            hidden=hidden,
            intermediate=int(cfg.get("intermediate_size") or 4 * hidden),
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab=int(cfg["vocab_size"]),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", False)) or cfg.get("model_type") == "qwen2",
            norms_per_layer=4 if cfg.get("model_type") in ("gemma2", "gemma3") else 2,
            logit_softcap=cfg.get("final_logit_softcapping"),
            max_positions=int(cfg.get("max_position_embeddings") or 4096),
            hf_config={k: v for k, v in cfg.items() if not k.startswith("_")},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"model '{name}': config.json lacks a usable {exc}") from None
    if spec.model_type not in KNOWN_TYPES:
        spec = replace(spec, counted_params=count_params_on_meta(spec))
    return spec


def build_model(spec: ArchSpec, dtype: Any = None, attn_implementation: str = "sdpa") -> Any:
    """AutoModelForCausalLM from the spec's config, on the current default device.

    Call it under `torch.device("meta")` to count parameters, or under FakeTensorMode to
    simulate; no weights are read either way.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(spec.hf_config)
    model_type = cfg.pop("model_type", spec.model_type)
    for key in ("architectures", "torch_dtype", "dtype", "transformers_version", "auto_map"):
        cfg.pop(key, None)
    config = AutoConfig.for_model(model_type, **cfg)
    config.use_cache = False
    if spec.model_type in EAGER_ONLY:
        attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(
        config, dtype=dtype or torch.float32, attn_implementation=attn_implementation
    )


def count_params_on_meta(spec: ArchSpec) -> int:
    """Exact parameter count of any transformers architecture, built with no memory."""
    import torch

    try:
        with torch.device("meta"):
            model = build_model(spec)
    except Exception as exc:  # unknown model_type, remote code, ...
        raise ConfigError(
            f"model '{spec.name}': cannot build it to count parameters: {exc}"
        ) from None
    return sum(p.numel() for p in model.parameters())
