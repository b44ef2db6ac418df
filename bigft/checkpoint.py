"""Resumable checkpoints and the exported model.

A checkpoint directory `checkpoints/step-00000100/` holds what Accelerate saves
(weights, optimizer, RNG states of every process) plus `trainer_state.json` (step, data
position, counters, scheduler). It is written under a `.tmp` name and renamed into
place only when complete, so a kill at any moment leaves the previous checkpoint intact
and `resume: auto` never picks a partial one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from bigft import faults
from bigft.errors import BigftError, TrainingError

_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^(step-\d+)\.(tmp|old)$")
STATE_FILE = "trainer_state.json"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a directory counts once its state file exists)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    step: int,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write a checkpoint atomically (all processes call this) and prune old ones.

    A write that fails (disk full, permissions) on any process removes the partial
    directory and raises TrainingError on every process; earlier checkpoints are intact.
    """
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    failure: OSError | None = None
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = _attempt(lambda: tmp.mkdir(parents=True))
    _all_written(accelerator, failure, tmp, step)
    failure = _attempt(lambda: accelerator.save_state(str(tmp), safe_serialization=True))
    accelerator.wait_for_everyone()
    faults.crash_in_save(step)
    if accelerator.is_main_process and failure is None:
        # The state file is written last: its presence marks the checkpoint complete.
        failure = _attempt(lambda: (tmp / STATE_FILE).write_text(json.dumps(state, indent=2)))
    _all_written(accelerator, failure, tmp, step)
    if accelerator.is_main_process:
        _move_into_place(tmp, final)
        best = best_checkpoint(output_dir)  # kept beyond keep_last
        for old in list_checkpoints(output_dir)[:-keep_last]:
            if old != best:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _attempt(write: Callable[[], object]) -> OSError | None:
    try:
        write()
    except OSError as exc:
        return exc
    return None


def _all_written(accelerator: Accelerator, failure: OSError | None, tmp: Path, step: int) -> None:
    """Every process learns whether a write failed anywhere (one small all-reduce), so
    they all stop together instead of some waiting forever at the next barrier."""
    failed = torch.tensor([0.0 if failure is None else 1.0], device=accelerator.device)
    if accelerator.reduce(failed, reduction="sum").item() == 0:
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    why = (failure.strerror or str(failure)) if failure else "failed on another process"
    raise TrainingError(
        f"checkpoint step {step}: cannot write {tmp} ({why}); the partial checkpoint was "
        "removed and earlier ones are intact: free disk space (or fix permissions) and run "
        "again to resume"
    )


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` to `final`. A checkpoint of the same step (re-saved at
    the end of a run) is moved aside first and deleted after, so a kill in between
    leaves a complete `step-N.old` that `clean_partial` restores."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def clean_partial(accelerator: Accelerator, output_dir: str | Path) -> list[str]:
    """Remove what a killed run left half-written; returns one note per change.

    `step-N.tmp` never finished (nothing can resume from it); `step-N.old` is a complete
    checkpoint that was being replaced: put back when its replacement is missing.
    """
    notes: list[str] = []
    root = checkpoint_root(output_dir)
    if accelerator.is_main_process and root.is_dir():
        for path in sorted(root.iterdir()):
            match = _LEFTOVER.match(path.name)
            if match is None or not path.is_dir():
                continue
            final = root / match.group(1)
            if match.group(2) == "old" and not final.exists() and (path / STATE_FILE).is_file():
                path.rename(final)
                notes.append(f"restored {final.name} (its replacement was never completed)")
            else:
                shutil.rmtree(path, ignore_errors=True)
                notes.append(f"removed the unfinished checkpoint {path.name}")
    accelerator.wait_for_everyone()  # nobody looks for checkpoints while they move
    return notes


def disk_free(path: Path) -> int:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return shutil.disk_usage(Path.cwd()).free


def check_disk_space(output_dir: str | Path, model: Any, optimizer: str, export: bool) -> None:
    """Refuse to start when output_dir cannot hold one checkpoint (weights + optimizer
    state) and the final export: better now than after hours of training. A lower
    bound: keep_last checkpoints and the engines' extra copies need more."""
    weights = state = trainable = 0.0
    for param in model.parameters():
        # ZeRO-3 partitions report their full size as ds_numel; FSDP2 DTensors, numel().
        numel = int(getattr(param, "ds_numel", param.numel()))
        weights += numel * param.element_size()
        if param.requires_grad:
            trainable += numel * param.element_size()
            state += _optimizer_state_bytes(optimizer, numel, param.element_size())
    exported = (trainable if hasattr(model, "peft_config") else weights) if export else 0.0
    needed = weights + state + exported
    free = disk_free(Path(output_dir).absolute())
    if free >= needed:
        return
    what = f"a checkpoint (weights {_size(weights)} + optimizer state {_size(state)})"
    if export:
        what += f" and the final export ({_size(exported)})"
    raise BigftError(
        f"output_dir '{output_dir}': {_size(free)} free, but {what} need about "
        f"{_size(needed)}; free space or choose another output_dir"
    )


def _optimizer_state_bytes(optimizer: str, numel: int, element_size: int) -> float:
    """Saved optimizer state of one trainable tensor: Adam's two moments, SGD's momentum;
    8-bit Adam keeps two 1-byte states per element; Adafactor's factored statistics are
    negligible."""
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        return 2.0 * numel
    return float({"adamw": 2, "sgd": 1}.get(optimizer, 0) * numel * element_size)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """'auto' -> latest complete checkpoint or None; 'never' -> None; else that path."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise BigftError(f"train.resume: '{resume}' is not a complete bigft checkpoint")
    return path


def check_compatible(path: Path, strategy: str, world_size: int) -> None:
    """Sharded checkpoints only load on the layout that wrote them; say how to convert."""
    saved = json.loads((path / STATE_FILE).read_text())
    old_strategy = saved.get("strategy", "ddp")
    old_world = saved.get("world_size", world_size)
    if old_strategy != strategy:
        raise BigftError(
            f"{path} was written with parallel.strategy={old_strategy}, this run uses "
            f"{strategy}; resume with the same strategy, or start from the exported weights "
            "(train.resume=never, model.name_or_path=<run>/final)"
        )
    if strategy != "ddp" and old_world != world_size:
        hint = (
            "convert it with DeepSpeed's universal checkpoint (ds_to_universal.py) or "
            "zero_to_fp32.py in the checkpoint directory"
            if strategy.startswith("zero")
            else "export full weights and start from them"
        )
        raise BigftError(
            f"{path} holds {strategy} shards of {old_world} process(es) but this run has "
            f"{world_size}; resume on {old_world} process(es), or {hint} "
            "(then train.resume=never, model.name_or_path=<converted dir>)"
        )


def load_checkpoint(
    accelerator: Accelerator, path: Path, allow_pickle: bool = False
) -> dict[str, Any]:
    """Restore model/optimizer/RNG in place; return the trainer state (with the scheduler's).

    Weights load from safetensors; a checkpoint holding them as a pickle is refused unless
    `allow_pickle`. Accelerate reads the optimizer and RNG files with
    torch.load(weights_only=True), which rebuilds tensors and plain containers only.
    DeepSpeed and FSDP2 checkpoints are the engines' own formats, which unpickle: resume
    only from checkpoints you wrote.
    """
    pickled = sorted(p.name for p in path.glob("pytorch_model*.bin") if p.is_file())
    if pickled and not any(path.glob("model*.safetensors")) and not allow_pickle:
        raise BigftError(
            f"{path} holds its weights as a pickle ({pickled[0]}), and unpickling can run "
            "code hidden in the file; resume only from checkpoints you trust, with "
            "model.allow_pickle=true"
        )
    # 4-bit (QLoRA) layers save their quantization constants as extra keys (`.absmax`,
    # `.quant_map`, ...) that a strict load rejects. The frozen 4-bit base is the one
    # already loaded, so those keys are skipped; every trainable weight is still loaded.
    accelerator.load_state(str(path), **({"strict": False} if _has_4bit_state(path) else {}))
    return json.loads((path / STATE_FILE).read_text())


def _has_4bit_state(path: Path) -> bool:
    from safetensors import safe_open

    files = list(path.glob("model*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            if any(k.endswith(".quant_map") for k in f.keys()):  # noqa: SIM118
                return True
    return False


def export_model(accelerator: Accelerator, model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Save a `from_pretrained`-loadable directory (safetensors + tokenizer), atomically."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    state_dict = accelerator.get_state_dict(model)  # gathers sharded weights when needed
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    accelerator.wait_for_everyone()
    return out


BEST_FILE = "best.json"


def mark_best(output_dir: str | Path, path: Path, info: dict[str, Any]) -> None:
    """Point checkpoints/best.json (and the `best` symlink) at `path` (main process only).

    Both are replaced atomically, so a reader sees the old or the new best, never a mix.
    """
    root = checkpoint_root(output_dir)
    tmp = root / (BEST_FILE + ".tmp")
    tmp.write_text(json.dumps({"checkpoint": path.name, **info}, indent=2))
    os.replace(tmp, root / BEST_FILE)
    link = root / "best.tmp-link"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(path.name)
    os.replace(link, root / "best")


def best_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint named by checkpoints/best.json, if any."""
    root = checkpoint_root(output_dir)
    try:
        name = json.loads((root / BEST_FILE).read_text())["checkpoint"]
    except (OSError, ValueError, KeyError):
        return None
    path = root / name
    return path if (path / STATE_FILE).is_file() else None
