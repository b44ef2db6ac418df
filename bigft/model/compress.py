"""Smaller exports of a run's final model: bitsandbytes int8 / nf4, GGUF, pruned.

Every form starts from the run's final model at full precision: RUN/final, or for an
adapter run the base with the adapter merged in (`merged_model`, QLoRA dequantized
first), written to a scratch folder inside the export and deleted before it is renamed
into place. Exports go through `staged_export` like `bigft export`: checked
destination, hidden temporary directory, rename; nothing half-written is left.

- int8 / nf4: the model is loaded with transformers' BitsAndBytesConfig and saved with
  its quantization_config, so a plain `from_pretrained(dir)` reloads the quantized
  layers (`Linear8bitLt` / `Linear4bit`). bitsandbytes keeps the output layer (LM head,
  classification head) and embeddings unquantized.
- gguf:q8_0 / gguf:f16: one .gguf file for llama.cpp (`gguf_export`), Llama and
  Mistral causal LMs only.
- prune: magnitude pruning of the linear layers inside the model's blocks (`prune`);
  embeddings, the LM head and classification heads are left whole.

Each export is described by compression_report.json beside it: sizes, parameters,
sparsity, and the metric before and after as the caller's `score` measures it.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bigft.config import Config
from bigft.errors import BigftError, require
from bigft.model.checks import holds_preprocessor
from bigft.model.export import (
    ADAPTER_CONFIG,
    MARKER,
    find_final,
    load_run_config,
    merged_model,
    staged_export,
)
from bigft.model.gguf_export import GGUF_TYPES, check_gguf_model, write_gguf
from bigft.model.prune import check_pruning, prune_model

log = logging.getLogger(__name__)

QUANTIZE_FORMATS = ("int8", "nf4", *(f"gguf:{t}" for t in GGUF_TYPES))
REPORT = "compression_report.json"
SCRATCH = ".full-precision"  # the merged model inside the export, removed before rename
# What save_pretrained writes for the weights themselves; every other file of a model
# directory (tokenizer, image processor, processor, chat template) is copied beside them.
_MODEL_FILES = {"config.json", "generation_config.json", ADAPTER_CONFIG, "README.md", MARKER}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")

# score(None) measures the run's own final model; score(DIR) the model saved in DIR.
Scorer = Callable[[Path | None], dict[str, Any] | None]


def check_format(fmt: str) -> str:
    """The --quantize value, checked before anything is loaded."""
    if fmt not in QUANTIZE_FORMATS:
        raise BigftError(
            f"--quantize {fmt}: unknown format; use one of {', '.join(QUANTIZE_FORMATS)}"
        )
    return fmt


def quantize_run(
    run_dir: str | Path,
    out: str | Path,
    fmt: str,
    overwrite: bool = False,
    score: Scorer | None = None,
) -> dict[str, Any]:
    """Export the run's final model quantized as `fmt` (see QUANTIZE_FORMATS) to `out`;
    returns the report written beside it."""
    check_format(fmt)

    def check(cfg: Config, source_config: dict[str, Any]) -> None:
        if fmt.startswith("gguf:"):
            require("gguf", "gguf", f"--quantize {fmt}")
            check_gguf_model(source_config, cfg.task)
        else:
            require("bitsandbytes", "quant", f"--quantize {fmt}")

    def build(cfg: Config, source: Path, tmp: Path) -> dict[str, Any]:
        if fmt.startswith("gguf:"):
            qtype = fmt.split(":", 1)[1]
            written = write_gguf(source, tmp / f"model-{qtype}.gguf", qtype, Path(run_dir).name)
            return {"parameters": written["parameters"]}
        return _bnb_quantized(cfg, source, tmp, fmt)

    return _compressed(Path(run_dir), Path(out), fmt, overwrite, check, build, score)


def prune_run(
    run_dir: str | Path,
    out: str | Path,
    sparsity: float,
    pattern: str = "unstructured",
    overwrite: bool = False,
    score: Scorer | None = None,
) -> dict[str, Any]:
    """Export the run's final model with the linear layers of its blocks magnitude-pruned
    to `sparsity` (`pattern` unstructured, or 2:4); returns the report."""
    check_pruning(sparsity, pattern)

    def build(cfg: Config, source: Path, tmp: Path) -> dict[str, Any]:
        from bigft.model.load import auto_class_for

        model = auto_class_for(cfg.task).from_pretrained(
            source, dtype="auto", trust_remote_code=cfg.model.trust_remote_code
        )
        facts = prune_model(model, sparsity, pattern)
        model.save_pretrained(tmp, safe_serialization=True)
        return facts

    fmt = f"prune:{pattern}"
    return _compressed(Path(run_dir), Path(out), fmt, overwrite, lambda *_: None, build, score)


def _compressed(
    run_dir: Path,
    out: Path,
    fmt: str,
    overwrite: bool,
    check: Callable[[Config, dict[str, Any]], None],
    build: Callable[[Config, Path, Path], dict[str, Any]],
    score: Scorer | None,
) -> dict[str, Any]:
    """The steps every form shares: find and check the run, stage the export, make the
    full-precision source, `build` the export from it, score both and write the report."""
    out = out.expanduser()
    if not run_dir.is_dir():
        raise BigftError(f"{run_dir}: no such run directory")
    final = find_final(run_dir)
    cfg = load_run_config(run_dir)
    adapter = (final / ADAPTER_CONFIG).is_file()
    check(cfg, _model_config(cfg, final, adapter))
    marker: dict[str, Any] = {"merged": adapter, "format": fmt}
    with staged_export(run_dir, final, out, overwrite, marker) as tmp:
        source = final
        if adapter:
            source = tmp / SCRATCH
            merged_model(cfg, final).save_pretrained(source, safe_serialization=True)
            copy_side_files(final if holds_preprocessor(final) else _base_dir(cfg), source)
        before = {"size": model_bytes(source), "parameters": stored_parameters(source)}
        facts = build(cfg, source, tmp)
        if not fmt.startswith("gguf:"):  # a .gguf file holds its tokenizer
            copy_side_files(source, tmp)
        if adapter:
            shutil.rmtree(source)
        gguf_file = next(iter(tmp.glob("*.gguf")), None)
        written = out / gguf_file.name if gguf_file is not None else out
        report = {
            "format": fmt,
            "run_dir": str(run_dir.resolve()),
            "output": str(written.resolve()),
            "merged_adapter": adapter,
            "size_bytes": {"before": before["size"], "after": model_bytes(tmp)},
            "parameters": {"before": before["parameters"], "after": facts.pop("parameters")},
            "sparsity": facts.pop("sparsity", None),
            **facts,
        }
        if score is not None:
            report.update(_scores(score, tmp if gguf_file is None else None))
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _scores(score: Scorer, model_dir: Path | None) -> dict[str, Any]:
    """The task metric of the original and of the export (None: bigft cannot run it)."""
    before = score(None)
    if before is None:
        why = (
            "the run holds no validation or test rows to score on; score the export with "
            "bigft eval DIR --data FILE"
        )
        return {"before": None, "after": None, "after_not_measured": why}
    if model_dir is not None:
        return {"before": before, "after": score(model_dir)}
    why = (
        "bigft cannot run GGUF files; score it with llama.cpp (e.g. llama-perplexity -m FILE "
        "-f TEXT)"
    )
    return {"before": before, "after": None, "after_not_measured": why}


def _bnb_quantized(cfg: Config, source: Path, tmp: Path, fmt: str) -> dict[str, Any]:
    """Load `source` with bitsandbytes 8-bit or nf4 (double-quantized) linear layers and
    save it with its quantization_config."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    from bigft._compat import disable_bnb_cpu_repack
    from bigft.model.load import auto_class_for, count_parameters

    dtype = _saved_dtype(source)
    if fmt == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    model = auto_class_for(cfg.task).from_pretrained(
        source,
        quantization_config=config,
        device_map={"": device},
        dtype=dtype,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    disable_bnb_cpu_repack(model)
    layer = bnb.nn.Linear8bitLt if fmt == "int8" else bnb.nn.Linear4bit
    quantized = sum(isinstance(m, layer) for m in model.modules())
    if not quantized:
        raise BigftError(f"--quantize {fmt}: bitsandbytes quantized no layer of this model")
    model.save_pretrained(tmp, safe_serialization=True)
    return {"parameters": count_parameters(model)[1], "quantized_layers": quantized}


def model_bytes(directory: Path) -> int:
    """Bytes of the model's files in `directory` (bigft's own notes and scratch excluded)."""
    skip = {MARKER, REPORT}
    return sum(
        p.stat().st_size
        for p in directory.rglob("*")
        if p.is_file() and p.name not in skip and SCRATCH not in p.relative_to(directory).parts
    )


def stored_parameters(directory: Path) -> int:
    """Values stored in the safetensors files of a full-precision model directory."""
    from safetensors import safe_open

    total = 0
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            names = handle.keys()
            total += sum(torch.Size(handle.get_slice(k).get_shape()).numel() for k in names)
    return total


def copy_side_files(source: Path, dest: Path) -> None:
    """Copy the files beside the weights (tokenizer, image processor, processor, chat
    template) from the model directory `source` into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if not path.is_file() or path.name in _MODEL_FILES or path.name == REPORT:
            continue
        if path.name.endswith(_WEIGHT_SUFFIXES) or path.name.startswith("adapter_model"):
            continue
        shutil.copy2(path, dest / path.name)


def _base_dir(cfg: Config) -> Path:
    """The local directory whose tokenizer / processor files an adapter run used."""
    base = Path(cfg.model.tokenizer or cfg.model.name_or_path).expanduser()
    if not base.is_dir():
        raise BigftError(
            f"the run's final adapter holds no tokenizer files and its base {base} is not a "
            "local directory: save the tokenizer into RUN/final and retry"
        )
    return base


def _model_config(cfg: Config, final: Path, adapter: bool) -> dict[str, Any]:
    """config.json of the model to compress (for an adapter run, its base's)."""
    if not adapter:
        return dict(json.loads((final / "config.json").read_text()))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        cfg.model.name_or_path,
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    return dict(config.to_dict())


def _saved_dtype(model_dir: Path) -> torch.dtype:
    """The dtype a model directory's weights were saved in (config.json), default fp32."""
    config = json.loads((model_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
