"""Resumable checkpoints and the exported model.

A checkpoint directory `checkpoints/step-00000100/` holds what Accelerate saves
(weights, optimizer, RNG states of every process) plus `trainer_state.json` (step, data
position, counters, scheduler). It is written under a `.tmp` name and renamed into
place only when complete, so a kill at any moment leaves the previous checkpoint intact
and `resume: auto` never picks a partial one.

With a frozen base (lora, dora, qlora, freeze) the checkpoint holds only what training
changes: the trainable weights (and the model's buffers) and the optimizer state. The
frozen base is read again from model.name_or_path on resume; `base_model.json` records
which base it was, so a resume onto another one is refused.

Before anything is loaded, a checkpoint is checked whole (`checkpoint_problem`): its files
are present, trainer_state.json parses, safetensors headers parse and match the file
length, the engines' pickles end where their zip directory says. `resume: auto` passes
over a damaged checkpoint to the newest whole one (`find_resume`); missing or unreadable
RNG states are resumed with a warning, since the run can go on but no longer matches an
uninterrupted one bit for bit.
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
from bigft.engine.state_files import save_state
from bigft.engine.storage import share_like_other_files
from bigft.errors import TrainingError
from bigft.tracking import strict_json

_STEP_DIR = re.compile(r"^step-(\d+)$")


LEFTOVER = re.compile(r"^(step-\d+)\.(tmp|old)$")


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
    failure = _attempt(lambda: save_state(accelerator, tmp))
    accelerator.wait_for_everyone()
    faults.crash_in_save(step)
    if accelerator.is_main_process and failure is None:
        # The state file is written last: its presence marks the checkpoint complete.
        text = strict_json(state, indent=2, default=str)  # NaN/inf (an eval) become null
        failure = _attempt(lambda: (tmp / STATE_FILE).write_text(text))
    _all_written(accelerator, failure, tmp, step)
    if accelerator.is_main_process:
        share_like_other_files(tmp)
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
            match = LEFTOVER.match(path.name)
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
        share_like_other_files(tmp)
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
    tmp.write_text(strict_json({"checkpoint": path.name, **info}, indent=2))
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
