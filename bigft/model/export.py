"""`bigft export`: a run's final model as an adapter directory or a merged full model.

A peft run's `final/` holds only the adapter (it loads with `PeftModel.from_pretrained`
on the base named in its adapter_config.json). `--merge` folds the adapter into the base
and writes a plain transformers model. For QLoRA the 4-bit base is dequantized first and
the adapter merged into those weights: the merged model computes exactly what the
trained (4-bit base + adapter) model computed. Merging into the 4-bit base instead would
re-quantize the sum and change the logits.

`--out` never costs the user a file bigft did not write: the export is assembled in a
fresh hidden directory beside `--out` and renamed into place. An existing `--out` is
replaced only when it is empty or a previous bigft export (it holds `bigft_export.json`);
any other directory needs `--overwrite`, and nothing ever replaces the run directory,
a folder that contains it, the working directory or the home directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bigft.config import Config
from bigft.config_io import load_config
from bigft.engine.storage import current_umask, share_like_other_files
from bigft.errors import BigftError, require
from bigft.rundir import holds_run, resolved

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
MARKER = "bigft_export.json"  # written into every export: marks a directory bigft made


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

    from bigft.model.load import load_model

    quant = cfg.method.quant if cfg.method.name == "qlora" else None
    base = load_model(cfg.model, quant=quant, **_base_for_task(cfg))
    if quant is not None:
        # Exact: these are the very weights the 4-bit layers computed with in training.
        base = base.dequantize()
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    merged = model.merge_and_unload()
    merged.config.use_cache = True
    return merged


def _base_for_task(cfg: Config) -> dict[str, Any]:
    """load_model arguments that build the base the run's adapter was trained on: the
    task's model class and, for a classification head, its classes (in the run's order)
    and the pad id a decoder pools by. The adapter holds the trained head itself."""
    if cfg.task in ("causal_lm", "contrastive"):
        return {"task": cfg.task}
    from bigft.data.labeled import label_names_from
    from bigft.model.load import load_preprocessor, pad_token_id

    labels = None if cfg.task == "regression" else label_names_from(cfg.data)
    return {
        "task": cfg.task,
        "label_names": labels,
        "pad_token_id": pad_token_id(load_preprocessor(cfg)),
    }


def check_destination(run_dir: Path, out: Path, overwrite: bool) -> bool:
    """Refuse an `--out` whose contents the export would destroy; True when an existing
    directory is to be replaced."""
    target, run = resolved(out, "--out"), resolved(run_dir, "run directory")
    protected = {Path.cwd().resolve(): "the working directory", Path.home().resolve(): "your home"}
    if target == run or target in run.parents:
        what = "the run directory" if target == run else f"a folder holding the run {run_dir}"
        raise BigftError(f"--out {out} is {what}; export to a new directory, e.g. {run_dir}-export")
    if target in protected or target == Path(target.anchor):
        where = protected.get(target, "the filesystem root")
        raise BigftError(f"--out {out} is {where}; export to a new directory")
    if target.exists() and not target.is_dir():
        raise BigftError(f"--out {out} is a file; choose a directory path")
    if not target.exists():
        return False
    if not any(target.iterdir()) or (target / MARKER).is_file():
        return True
    if run in target.parents or holds_run(target):
        what = "part of the run" if run in target.parents else "another run's directory"
        raise BigftError(f"--out {out} is {what}; export to a new directory")
    if not overwrite:
        raise BigftError(
            f"--out {out} holds files that are not a bigft export; choose a new directory, "
            "or pass --overwrite to replace its contents"
        )
    return True


def export_run(
    run_dir: str | Path, out: str | Path, merge: bool = False, overwrite: bool = False
) -> Path:
    """Write the run's final model to `out`: adapter only, merged, or the full model."""
    from bigft.model.load import load_tokenizer

    run_dir, out = Path(run_dir), Path(out).expanduser()
    final = find_final(run_dir)
    is_adapter = (final / ADAPTER_CONFIG).is_file()
    marker: dict[str, Any] = {"merged": False}
    with staged_export(run_dir, final, out, overwrite, marker) as tmp:
        cfg = load_run_config(run_dir) if is_adapter and merge else None
        if cfg is not None:
            model = merged_model(cfg, final)
            model.save_pretrained(tmp, safe_serialization=True)
            # The run saved its tokenizer beside the adapter; fall back to the base's.
            if (final / "tokenizer_config.json").is_file():
                cfg.model.tokenizer = str(final)
            load_tokenizer(cfg.model).save_pretrained(tmp)
            marker["merged"] = True
        else:
            if merge:
                log.warning("%s is a full model already; copying it", final)
            shutil.copytree(final, tmp, dirs_exist_ok=True)
    return out


@contextmanager
def staged_export(
    run_dir: Path, final: Path, out: Path, overwrite: bool, marker: dict[str, Any]
) -> Iterator[Path]:
    """A fresh hidden directory beside `out` to write an export into. When the block
    succeeds, `marker` (which the block may still change) is written into it as
    bigft_export.json and it is renamed to `out`, replacing a previous export as
    `check_destination` allows; when the block fails it is removed and `out` is untouched."""
    if resolved(out, "--out") == final.resolve():
        raise BigftError(f"--out {out} is the run's own final model; choose another directory")
    replace = check_destination(run_dir, out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise BigftError(f"--out {out}: cannot write there ({exc.strerror})") from None
    try:
        yield tmp
        info = {"run_dir": str(run_dir.resolve()), **marker}
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; share it
        share_like_other_files(tmp)
        if replace:
            _replace(out, tmp)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(out: Path, tmp: Path) -> None:
    """Swap `tmp` in for the existing `out`: the old contents are moved aside first and
    deleted only once the new export is in place."""
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rmdir(old)
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
