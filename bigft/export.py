"""`bigft export`: a run's final model as an adapter directory or a merged full model.

A peft run's `final/` holds only the adapter (it loads with `PeftModel.from_pretrained`
on the base named in its adapter_config.json). `--merge` folds the adapter into the base
and writes a plain transformers model. For QLoRA the 4-bit base is dequantized first and
the adapter merged into those weights: the merged model computes exactly what the
trained (4-bit base + adapter) model computed. Merging into the 4-bit base instead would
re-quantize the sum and change the logits.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from bigft.config import Config, load_config
from bigft.errors import BigftError, require

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


def find_final(run_dir: Path) -> Path:
    """The exported model of a run: RUN_DIR/final, or RUN_DIR itself if it is one."""
    for candidate in (run_dir / "final", run_dir):
        if (candidate / ADAPTER_CONFIG).is_file() or (candidate / "config.json").is_file():
            return candidate
    raise BigftError(
        f"{run_dir}: no exported model (expected {run_dir / 'final'}); finish the run with "
        "checkpoint.export: true"
    )


def load_run_config(run_dir: Path) -> Config:
    """The resolved config a run wrote beside its outputs."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise BigftError(f"{run_dir}: not a bigft run directory (no config.yaml)")
    return load_config(path)


def merged_model(cfg: Config, adapter_dir: Path) -> Any:
    """Base model + adapter merged into plain weights (dequantized first for QLoRA)."""
    require("peft", "lora", "merging an adapter")
    from peft import PeftModel

    from bigft.model import load_model

    quant = cfg.method.quant if cfg.method.name == "qlora" else None
    base = load_model(cfg.model, quant=quant)
    if quant is not None:
        # Exact: these are the very weights the 4-bit layers computed with in training.
        base = base.dequantize()
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    merged = model.merge_and_unload()
    merged.config.use_cache = True
    return merged


def export_run(run_dir: str | Path, out: str | Path, merge: bool = False) -> Path:
    """Write the run's final model to `out`: adapter only, merged, or the full model."""
    from bigft.model import load_tokenizer

    run_dir, out = Path(run_dir), Path(out)
    final = find_final(run_dir)
    is_adapter = (final / ADAPTER_CONFIG).is_file()
    if out.resolve() == final.resolve():
        raise BigftError(f"--out {out} is the run's own final model; choose another directory")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if is_adapter and merge:
        cfg = load_run_config(run_dir)
        model = merged_model(cfg, final)
        model.save_pretrained(tmp, safe_serialization=True)
        # The run saved its tokenizer beside the adapter; fall back to the base's.
        if (final / "tokenizer_config.json").is_file():
            cfg.model.tokenizer = str(final)
        load_tokenizer(cfg.model).save_pretrained(tmp)
    else:
        if merge:
            log.warning("%s is a full model already; copying it", final)
        shutil.copytree(final, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
