"""Model and tokenizer directories checked before transformers reads them: the files a model
needs are there, safetensors headers parse and fit the file, pickled weights are refused
unless allowed, and the sequence length fits the model's context.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from bigft.config import ModelConfig
from bigft.errors import ModelError

# What save_pretrained writes for a tokenizer, an image processor and a processor.
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
PREPROCESSOR_FILES = ("tokenizer_config.json", *IMAGE_PROCESSOR_FILES)


def holds_preprocessor(directory: Path, names: tuple[str, ...] = PREPROCESSOR_FILES) -> bool:
    """Whether `directory` holds a saved tokenizer, image processor or processor (one of
    `names`)."""
    return any((directory / name).is_file() for name in names)


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


def _check_source(name: str, what: str) -> None:
    """A local path that does not exist is a typo, not a hub id: say so before transformers."""
    path = Path(name).expanduser()
    if _looks_local(name) and not path.exists():
        raise ModelError(
            f"{what} '{name}': directory not found; check the path (a hub id such as "
            "org/model has no leading '/', '.' or '~')"
        )
    if _looks_local(name) and not path.is_dir():
        raise ModelError(
            f"{what} '{name}' is a file, not a model directory; give the directory that "
            "holds config.json and the weights"
        )


# What transformers tokenizers are saved as (vocabularies, sentencepiece and tiktoken
# models, their configs: byte-level tokenizers have a config alone); a directory with
# none of them holds no tokenizer at all.
TOKENIZER_FILES = (
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "*.model",
    "*.spm",
    "*.tiktoken",
)


ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter: transformers loads its base


def check_model_dir(
    name: str, what: str = "model.name_or_path", allow_pickle: bool = False
) -> None:
    """File-level checks of a local model directory, before transformers reads it.

    A missing directory, a missing or unparsable config.json, no weights, pickled weights
    (unless `allow_pickle`), and a 0-byte or truncated safetensors file are each a
    one-line ModelError naming `what` (the config key) and the file. transformers would
    otherwise fail deep inside loading, or blame the tokenizer, which it reads first. Hub
    ids are left to transformers.
    """
    _check_source(name, what)
    path = Path(name).expanduser()
    if not _looks_local(name):
        return
    config = path / "config.json"
    if not config.is_file() and (path / ADAPTER_CONFIG).is_file():
        return  # the base it names is checked by transformers
    if not config.is_file():
        raise ModelError(
            f"{what} '{name}' has no config.json; give a directory written by "
            "save_pretrained (config.json beside the weights)"
        )
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(
            f"{what} '{name}': {config.name} is not valid JSON ({first_line(exc)}); restore it "
            "from the original model"
        ) from None
    if not isinstance(parsed, dict):
        raise ModelError(
            f"{what} '{name}': {config.name} does not hold a JSON object; restore it from "
            "the original model"
        )
    _check_weights_format(name, allow_pickle, what)
    _check_weight_files(path, name, what)


def _check_weight_files(path: Path, name: str, what: str) -> None:
    """Every safetensors file (and each shard an index names) is present and whole."""
    files = sorted(path.glob("*.safetensors"))
    if not files and not any(path.glob("pytorch_model*.bin")):
        raise ModelError(
            f"{what} '{name}' holds no weights (model.safetensors); give the directory the "
            "model was saved to with save_pretrained"
        )
    for index in sorted(path.glob("*.safetensors.index.json")):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise ModelError(
                f"{what} '{name}': {index.name} is not a valid shard index; copy or download "
                "the model again"
            ) from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ModelError(
                f"{what} '{name}': {missing[0]} is missing (listed in {index.name}); copy or "
                "download the model again"
            )
    for file in files:
        problem = safetensors_problem(file)
        if problem is not None:
            raise ModelError(f"{what} '{name}': {problem}; copy or download the model again")


def safetensors_problem(file: Path) -> str | None:
    """Why `file` is not a whole safetensors file, or None: a cheap check (the header
    alone is read) that its header parses and the tensors it declares end exactly at the
    end of the file, which a 0-byte, truncated or overwritten file fails."""
    try:
        size = file.stat().st_size
        with file.open("rb") as fh:
            prefix = fh.read(8)
            if size == 0:
                return f"{file.name} is empty (0 bytes)"
            if len(prefix) < 8:
                return f"{file.name} is truncated ({size} bytes, shorter than a header)"
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                return (
                    f"{file.name} is truncated ({size} bytes; its header alone declares "
                    f"{header_len + 8})"
                )
            header = json.loads(fh.read(header_len))
    except OSError as exc:
        return f"{file.name} cannot be read ({exc.strerror or exc})"
    except (UnicodeDecodeError, ValueError):
        return f"{file.name} is not a safetensors file (its header is not valid JSON)"
    try:
        end = max(
            (int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"),
            default=0,
        )
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return f"{file.name} is not a safetensors file (its header lists no tensor offsets)"
    expected = 8 + header_len + end
    if size < expected:
        return f"{file.name} is truncated ({size} bytes; its header declares {expected})"
    if size > expected:
        return f"{file.name} is corrupt ({size} bytes; its header declares {expected})"
    return None


def check_tokenizer_files(name: str, what: str) -> None:
    """A local tokenizer source must hold a tokenizer (a fine-tuned model saved without
    one is a common slip); its config.json, if any, must parse."""
    _check_source(name, what)
    path = Path(name).expanduser()
    if not _looks_local(name):
        return
    config = path / "config.json"
    if config.is_file():
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ModelError(
                f"{what} '{name}': {config.name} is not valid JSON ({first_line(exc)}); "
                "restore it from the original model"
            ) from None
    if not any(f.is_file() for pattern in TOKENIZER_FILES for f in path.glob(pattern)):
        hint = (
            "set model.tokenizer to the directory of the tokenizer it was trained with (e.g. "
            "its base model), or save the tokenizer into it (tokenizer.save_pretrained)"
            if what == "model.name_or_path"
            else "point model.tokenizer at a directory that holds one"
        )
        raise ModelError(
            f"{what} '{name}' holds no tokenizer (no tokenizer.json, tokenizer.model, "
            f"vocab.json or the like); {hint}"
        )


def context_limit(config: Any) -> tuple[int, str] | None:
    """(positions the model can attend over, where that number comes from) read from a
    transformers config, or None when the config states no limit.

    Rope scaling counts: a linear / dynamic / yarn factor stretches max_position_embeddings
    unless the config already states the stretched length (llama3, or an
    original_max_position_embeddings below it).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            break
    else:
        return None
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
    if not isinstance(rope, dict):
        return value, attr
    kind = rope.get("rope_type", rope.get("type", "default"))
    factor = rope.get("factor")
    original = rope.get("original_max_position_embeddings")
    stretched = isinstance(original, int) and original < value
    if kind in ("default", "llama3") or not isinstance(factor, int | float) or stretched:
        return value, attr
    if factor <= 1:
        return value, attr
    return int(value * factor), f"{attr} {value} x rope factor {factor}"


def check_model_config(cfg: ModelConfig, seq_len: int, what: str = "model.name_or_path") -> None:
    """The model's configuration loads (an unknown architecture, code it ships that is not
    trusted: the same ModelError loading would give, before any data is read or file
    written), and train.seq_len fits its positions.

    bigft refuses a train.seq_len beyond the model's position limit (`context_limit` of its
    config.json): learned position embeddings fail with an index error past it, and
    rotary models degrade silently; the message says to lower seq_len or configure rope
    scaling.
    """
    from transformers import AutoConfig

    local = Path(cfg.name_or_path).expanduser()
    if _looks_local(cfg.name_or_path) and not (local / "config.json").is_file():
        return  # a PEFT adapter directory: its base is read when the model loads
    try:
        config = AutoConfig.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise load_error(cfg, exc, what) from None
    found = context_limit(config)
    if found is None or seq_len <= found[0]:
        return
    limit, source = found
    raise ModelError(
        f"train.seq_len {seq_len} is longer than model '{cfg.name_or_path}' supports: "
        f"{limit} positions ({source} in its config.json); lower train.seq_len to {limit} or "
        "less, or extend the model's context with rope scaling in its config.json "
        '(rope_scaling, e.g. {"rope_type": "linear", "factor": 2.0}) if it uses '
        "rotary positions"
    )


def _check_weights_format(name: str, allow_pickle: bool, what: str = "model.name_or_path") -> None:
    """A local model whose weights exist only as pickles is refused before transformers
    sees it, with the one-line conversion; hub ids are checked by `use_safetensors`."""
    path = Path(name).expanduser()
    if allow_pickle or not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in path.glob("pytorch_model*.bin"))
    if pickled:
        convert = (
            f'python -c "from transformers import AutoModelForCausalLM as M; '
            f"M.from_pretrained('{name}').save_pretrained('{name}')\""
        )
        raise ModelError(
            f"{what} '{name}' holds its weights only as a pickle ({pickled[0]}), "
            f"which can run code when loaded; convert it once, where you trust the file "
            f"({convert}), or set model.allow_pickle=true"
        )


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_error(cfg: ModelConfig, exc: BaseException, what: str) -> ModelError:
    """transformers' loading errors, reworded where bigft's own settings are the cause."""
    text = str(exc)
    name = cfg.name_or_path
    if "trust_remote_code" in text:
        return ModelError(
            f"model '{name}' ships its own modelling code (auto_map in its config.json), which "
            "bigft runs only with model.trust_remote_code=true: read that code first"
        )
    hint = ""
    if "safetensors" in text and not cfg.allow_pickle:
        hint = " (bigft loads safetensors weights only unless model.allow_pickle=true)"
    return ModelError(f"{what}: cannot load model '{name}': {first_line(exc)}{hint}")
