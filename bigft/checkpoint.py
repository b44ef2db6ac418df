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

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from bigft import faults
from bigft.errors import BigftError, TrainingError
from bigft.model import safetensors_problem
from bigft.tracking import strict_json

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
    failure = _attempt(lambda: _save_state(accelerator, tmp))
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


def check_writable(output_dir: str | Path) -> None:
    """Refuse an output_dir this process cannot write: output_dir itself when it exists,
    else the nearest existing parent it would be created in.

    An anonymous temporary file proves it (O_TMPFILE: no name ever appears in the
    directory), where permission bits do not: root ignores them, and a read-only mount
    or a pseudo-filesystem refuses root too (and reports 0 bytes free).
    """
    out = Path(output_dir)
    existing = next((p for p in (out.absolute(), *out.absolute().parents) if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise BigftError(
            f"output_dir '{output_dir}' is not writable ({os.strerror(errno.ENOTDIR)}: "
            f"'{existing}' is a file); choose another output_dir"
        )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        why = exc.strerror or str(exc)
        if existing != out.absolute():
            why = f"it would be created in '{existing}': {why}"
        raise BigftError(
            f"output_dir '{output_dir}' is not writable ({why}); choose another output_dir, "
            "or make it writable"
        ) from None


def check_disk_space(output_dir: str | Path, model: Any, optimizer: str, export: bool) -> None:
    """Refuse to start when output_dir cannot be written (`check_writable`), or cannot
    hold one checkpoint (trained weights + optimizer state; a frozen base is not saved)
    and the final export: better now than after hours of training. A lower bound:
    keep_last checkpoints and the engines' extra copies need more."""
    check_writable(output_dir)
    weights = state = trainable = 0.0
    for param in model.parameters():
        # ZeRO-3 partitions report their full size as ds_numel; FSDP2 DTensors, numel().
        numel = int(getattr(param, "ds_numel", param.numel()))
        weights += numel * param.element_size()
        if param.requires_grad:
            trainable += numel * param.element_size()
            state += _optimizer_state_bytes(optimizer, numel, param.element_size())
    exported = (trainable if hasattr(model, "peft_config") else weights) if export else 0.0
    needed = trainable + state + exported
    free = disk_free(Path(output_dir).absolute())
    if free >= needed:
        return
    what = f"a checkpoint (weights {_size(trainable)} + optimizer state {_size(state)})"
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


# ---------------------------------------------------------------------------------------
# Which checkpoint to resume from, checked whole before anything is loaded.

RNG_FILE = "random_states_{}.pkl"  # Accelerate's RNG states, one file per process


@dataclass
class ResumePoint:
    """The checkpoint a run resumes from, and what to tell the user about it."""

    path: Path
    notes: list[str] = field(default_factory=list)  # damaged checkpoints passed over
    warnings: list[str] = field(default_factory=list)  # why it will not match bit for bit
    # Where it is before `clean_partial` runs: `step-N.old` when that is put back as `path`.
    found_at: Path | None = None

    @property
    def location(self) -> Path:
        """Where the checkpoint's files are now."""
        return self.found_at or self.path


def find_resume(resume: str, output_dir: str | Path, num_processes: int) -> ResumePoint | None:
    """The checkpoint train.resume names, checked whole (read-only: run it before any
    write); None to start afresh.

    'auto': the newest whole checkpoint; damaged newer ones are passed over with a note,
    and when every checkpoint is damaged the run is refused (rather than silently
    retraining from step 0 over them). A checkpoint the cleanup of a killed save restores
    (`step-N.old`, see `clean_partial`) counts under its final name. An explicit path
    must be whole.
    """
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise BigftError(f"train.resume: '{resume}' is not a complete bigft checkpoint")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise BigftError(
                f"train.resume: checkpoint '{resume}' is damaged: {problem}; resume from "
                "another checkpoint (train.resume=<its directory>, or auto for the newest "
                "whole one)"
            )
        return ResumePoint(path, warnings=rng_warnings(path, num_processes))
    notes: list[str] = []
    damaged: list[str] = []
    for final, location in reversed(_resume_candidates(output_dir)):
        problem = checkpoint_problem(location)
        if problem is None:
            notes = [f"{n}; resuming from {final.name}" for n in notes]
            return ResumePoint(final, notes, rng_warnings(location, num_processes), location)
        notes.append(f"skipped the damaged checkpoint {final}: {problem}")
        damaged.append(f"{final.name}: {problem}")
    if damaged:
        raise BigftError(
            f"train.resume auto: no whole checkpoint in {checkpoint_root(output_dir)} "
            f"({'; '.join(damaged)}); restore or delete the damaged files, resume from "
            "another copy (train.resume=<checkpoint directory>), or pass --overwrite to move "
            "this run aside and start over"
        )
    return None


def _resume_candidates(output_dir: str | Path) -> list[tuple[Path, Path]]:
    """(final name, where it is now) of every complete checkpoint, oldest first."""
    found = {path: path for path in list_checkpoints(output_dir)}
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for path in root.iterdir():
            match = _LEFTOVER.match(path.name)
            if match and match.group(2) == "old" and (path / STATE_FILE).is_file():
                final = root / match.group(1)
                if not final.exists():
                    found[final] = path
    return sorted(found.items(), key=lambda item: item[0].name)


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint in `path` cannot be resumed from, or None when it is whole.

    Cheap checks only (no tensor is read): the files its engine writes are present and
    not empty, trainer_state.json parses, every safetensors header parses and declares
    the file's length, every torch pickle (a zip) has its central directory, every DCP
    shard holds the bytes its metadata declares. RNG states are not required (see
    `rng_warnings`).
    """
    state_file = path / STATE_FILE
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"{STATE_FILE} is not valid JSON ({_short(exc)})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{STATE_FILE} holds no step"
    if not isinstance(state.get("loader"), dict):
        return f"{STATE_FILE} holds no data position (loader)"
    missing = _missing_engine_files(path, str(state.get("strategy", "ddp")))
    if missing is not None:
        return f"{missing} is missing"
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        problem = _file_problem(path, file)
        if problem is not None:
            return problem
    return None


def _missing_engine_files(path: Path, strategy: str) -> str | None:
    """The first file (pattern) the engine that wrote the checkpoint always writes, when
    it is absent."""
    if strategy.startswith("zero"):
        engine = path / "pytorch_model"  # Accelerate's DeepSpeed tag
        if not any(engine.glob("*model_states.pt")):
            return "pytorch_model/*model_states.pt"
        if not any(engine.glob("*optim_states.pt")):
            return "pytorch_model/*optim_states.pt"
        return None
    if strategy == "fsdp2":
        if not (path / _fsdp_dir(0) / ".metadata").is_file():
            return f"{_fsdp_dir(0)}/.metadata"
        if not (path / "optimizer_0" / ".metadata").is_file() and not any(
            path.glob("optimizer*.bin")
        ):
            return "optimizer_0/.metadata"
        return None
    if not any(path.glob("model*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        return "model.safetensors"
    if not any(path.glob("optimizer*.bin")):
        return "optimizer.bin"
    return None


def _file_problem(root: Path, file: Path) -> str | None:
    """Why one file of a checkpoint is damaged, or None."""
    name = str(file.relative_to(root))
    if file.name.startswith("random_states_"):
        return None  # optional: rng_warnings
    if file.suffix == ".safetensors":
        problem = safetensors_problem(file)
        return None if problem is None else problem.replace(file.name, name, 1)
    if file.suffix in (".bin", ".pt", ".pkl"):
        return _torch_file_problem(file, name)
    if file.suffix == ".json":
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            return f"{name} is not valid JSON ({_short(exc)})"
    if file.name == ".metadata":
        return _dcp_problem(file.parent, name)
    return None


def _torch_file_problem(file: Path, name: str) -> str | None:
    """torch.save writes a zip whose directory sits at the very end: a truncated file
    has none. (A legacy non-zip pickle is only checked for being non-empty.)"""
    try:
        if file.stat().st_size == 0:
            return f"{name} is empty (0 bytes)"
        with file.open("rb") as fh:
            is_zip = fh.read(2) == b"PK"
        if is_zip:
            with zipfile.ZipFile(file) as archive:
                archive.infolist()
    except OSError as exc:
        return f"{name} cannot be read ({exc.strerror or exc})"
    except zipfile.BadZipFile:
        return f"{name} is truncated or corrupt (its zip directory is unreadable)"
    return None


def _dcp_problem(folder: Path, name: str) -> str | None:
    """A torch.distributed.checkpoint folder: every byte range its metadata names exists."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
        storage = metadata.storage_data or {}
        ends: dict[str, int] = {}
        for info in storage.values():
            end = int(info.offset) + int(info.length)
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), end)
    except Exception as exc:  # an unpicklable or cut metadata file raises anything
        return f"{name} is unreadable ({_short(exc)})"
    for relative, end in sorted(ends.items()):
        shard = folder / relative
        size = shard.stat().st_size if shard.is_file() else None
        if size is None:
            return f"{shard.relative_to(folder.parent)} is missing"
        if size < end:
            return (
                f"{shard.relative_to(folder.parent)} is truncated ({size} bytes; "
                f"{folder.name}/.metadata declares {end})"
            )
    return None


def rng_warnings(path: Path, num_processes: int) -> list[str]:
    """What will not match an uninterrupted run when resuming from `path`: each
    process's RNG state file (dropout, random sampling) that is missing or unreadable."""
    from accelerate.utils import load

    found: list[str] = []
    for rank in range(num_processes):
        file = path / RNG_FILE.format(rank)
        if not file.is_file():
            found.append(f"rng state missing: {file}")
            continue
        try:
            states = load(file, map_location="cpu")
            readable = isinstance(states, dict) and "torch_manual_seed" in states
        except Exception:  # torch.load of a damaged file raises many kinds
            readable = False
        if not readable:
            found.append(f"rng state unreadable: {file}")
    if not found:
        return []
    shown = "; ".join(found[:2]) + ("; ..." if len(found) > 2 else "")
    return [
        f"{shown}; resumed anyway: dropout and other random draws, and so the results, "
        "will not match an uninterrupted run"
    ]


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


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
    if strategy != "ddp" and old_world != world_size and (path / BASE_FILE).is_file():
        raise BigftError(
            f"{path} holds {strategy} shards of {old_world} process(es) but this run has "
            f"{world_size}; resume on {old_world} process(es) (it holds only the trained "
            "tensors of a frozen base, which the engines' converters do not make a model of)"
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


def check_fits(path: Path, model: Any) -> None:
    """BigftError when the weights file of a DDP / single-process checkpoint does not fit
    `model` (a tensor it trains is missing, one it lacks is there, a shape differs),
    read from the safetensors header alone, so a resume that cannot load fails before
    anything is written. Engines' own formats are checked when loaded."""
    file = path / "model.safetensors"
    if not file.is_file():
        return
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as f:
        saved = {_plain(model, k): k for k in f.keys()}  # noqa: SIM118
        shapes = {k: list(f.get_slice(saved[k]).get_shape()) for k in saved}
    _check_keys(path, model, saved, shapes)


def load_checkpoint(
    accelerator: Accelerator, path: Path, allow_pickle: bool = False
) -> dict[str, Any]:
    """Restore model/optimizer/RNG in place; return the trainer state (with the scheduler's).

    The checkpoint is checked whole first (`checkpoint_problem`): a damaged one is a
    BigftError before any state changes. Weights load from safetensors; a checkpoint
    holding them as a pickle is refused unless `allow_pickle`. Accelerate reads the
    optimizer and RNG files with
    torch.load(weights_only=True), which rebuilds tensors and plain containers only.
    DeepSpeed and FSDP2 checkpoints are the engines' own formats, which unpickle: resume
    only from checkpoints you wrote. Every tensor the model trains must be in the
    checkpoint, and nothing the model lacks may be: a mismatch is a one-line BigftError.
    """
    problem = checkpoint_problem(path)
    if problem is not None:  # checked whole first: never a half-loaded state
        raise BigftError(
            f"checkpoint {path} is damaged: {problem}; resume from another checkpoint "
            "(train.resume=<its directory>)"
        )
    pickled = sorted(p.name for p in path.glob("pytorch_model*.bin") if p.is_file())
    if pickled and not any(path.glob("model*.safetensors")) and not allow_pickle:
        raise BigftError(
            f"{path} holds its weights as a pickle ({pickled[0]}), and unpickling can run "
            "code hidden in the file; resume only from checkpoints you trust, with "
            "model.allow_pickle=true"
        )
    _load_state(accelerator, path)
    return json.loads((path / STATE_FILE).read_text())


# ---------------------------------------------------------------------------------------
# The model's part of a checkpoint. Full fine-tuning saves every weight (Accelerate's
# format, unchanged). With a frozen base only the trainable tensors and the buffers are
# written (the base of an 8B model is ~16 GB per checkpoint), through each engine's own
# means: a save hook under DDP, exclude_frozen_parameters under DeepSpeed, DCP under FSDP2.

BASE_FILE = "base_model.json"


def _has_frozen(accelerator: Accelerator) -> bool:
    return any(not p.requires_grad for m in accelerator._models for p in m.parameters())


def _save_state(accelerator: Accelerator, out: Path) -> None:
    """Accelerate's save_state (model, optimizer, RNG states), less the frozen weights."""
    if not _has_frozen(accelerator):  # full fine-tuning: every weight is trained
        accelerator.save_state(str(out), safe_serialization=True)
        return
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # exclude_frozen_parameters leaves out frozen parameters (and ZeRO-2/3's copies of
        # them); the hook what is no parameter either: 4-bit layers' quantization
        # constants (`.absmax`, ...), 3-12% of a 4-bit base.
        hooks = [
            accelerator.unwrap_model(m).register_state_dict_post_hook(_drop_frozen)
            for m in accelerator._models
        ]
        try:
            accelerator.save_state(
                str(out), safe_serialization=True, exclude_frozen_parameters=True
            )
        finally:
            for hook in hooks:
                hook.remove()
    elif accelerator.distributed_type == DistributedType.FSDP:
        _save_fsdp2(accelerator, out)
    else:

        def trainable_only(models: list[Any], weights: list[Any], _dir: str) -> None:
            for i, model in enumerate(models):
                plain = accelerator.unwrap_model(model)  # names without DDP's `module.`
                weights[i] = _trainable_only(plain, plain.state_dict())

        handle = accelerator.register_save_state_pre_hook(trainable_only)
        try:
            accelerator.save_state(str(out), safe_serialization=True)
        finally:
            handle.remove()
    if accelerator.is_main_process:
        (out / BASE_FILE).write_text(json.dumps(_base_fingerprint(accelerator), indent=2))


def _load_state(accelerator: Accelerator, path: Path) -> None:
    if not _has_frozen(accelerator):
        accelerator.load_state(str(path))
        return
    _check_base(accelerator, path)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # Our check replaces DeepSpeed's strict load, which would miss the frozen weights.
        accelerator.load_state(
            str(path), load_module_strict=False, custom_load_fn=partial(_load_module, path)
        )
    elif accelerator.distributed_type == DistributedType.FSDP:
        _load_fsdp2(accelerator, path)
    else:

        def load_trainable(models: list[Any], _dir: str) -> None:
            for i, model in enumerate(models):
                _load_weights(accelerator.unwrap_model(model), path, i)
            models.clear()  # loaded: Accelerate goes on with the optimizer and RNG states

        handle = accelerator.register_load_state_pre_hook(load_trainable)
        try:
            accelerator.load_state(str(path))
        finally:
            handle.remove()


def _trainable_only(model: Any, state: dict[str, Any]) -> OrderedDict[str, Any]:
    """The entries of `model`'s state dict that training changes: trainable parameters
    and buffers (an OrderedDict, which Accelerate de-duplicates tied tensors of)."""
    keep = {n for group in _expected_groups(model, state) for n in group}
    return OrderedDict((k, v) for k, v in state.items() if k in keep)


def _drop_frozen(module: Any, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    """A state_dict post-hook: keep only the entries training changes."""
    names = [k[len(prefix) :] for k in state if k.startswith(prefix)]
    keep = {prefix + n for group in _expected_groups(module, names) for n in group}
    for key in [k for k in state if k.startswith(prefix) and k not in keep]:
        del state[key]


def _expected_groups(model: Any, names: Iterable[str]) -> list[list[str]]:
    """State-dict `names` a checkpoint must hold, grouped by tensor: names of one tied
    tensor (an lm_head sharing the embedding) form one group, and any one of them will do."""
    known = set(names)
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.requires_grad and name in known:
            groups.setdefault(id(param), []).append(name)
    for name, buffer in model.named_buffers(remove_duplicate=False):
        if name in known:  # persistent buffers (running statistics); rarely any in an LLM
            groups.setdefault(id(buffer), []).append(name)
    return list(groups.values())


def _check_keys(
    path: Path, model: Any, found: Iterable[str], shapes: dict[str, list[int]] | None = None
) -> set[str]:
    """Names in `found` to load into `model`; BigftError when a trained tensor is missing,
    a name is one the model lacks, or (given `shapes`) a shape differs. Frozen weights in
    a checkpoint (written before bigft left them out) are ignored."""
    names = set(model.state_dict().keys())
    found = set(found)
    groups = _expected_groups(model, names)
    missing = [min(g) for g in groups if not found.intersection(g)]
    unexpected = sorted(found - names)
    wanted = {n for g in groups for n in g} & found
    params = dict(model.named_parameters(remove_duplicate=False))
    reshaped = [
        f"{n} {shapes[n]} (model {list(params[n].shape)})"
        for n in sorted(wanted)
        if shapes is not None and n in params and list(params[n].shape) != shapes[n]
    ]
    problems = []
    if missing:
        problems.append(f"it lacks {len(missing)} trained tensor(s): {_first(sorted(missing))}")
    if unexpected:
        problems.append(f"it holds {len(unexpected)} the model lacks: {_first(unexpected)}")
    if reshaped:
        problems.append(f"{len(reshaped)} differ in shape: {_first(reshaped)}")
    if problems:
        raise BigftError(
            f"checkpoint {path} does not fit this model ({'; '.join(problems)}); resume with "
            "the method and adapter settings it was written with, or start afresh "
            "(train.resume=never)"
        )
    return wanted


def _first(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _load_weights(model: Any, path: Path, index: int) -> None:
    """Load the saved tensors of model `index` (Accelerate's file names) into `model`."""
    suffix = f"_{index}" if index else ""
    file = path / f"model{suffix}.safetensors"
    pickled = path / f"pytorch_model{suffix}.bin"
    if not file.is_file() and not pickled.is_file():
        raise BigftError(f"checkpoint {path} holds no model weights ({file.name})")
    if not file.is_file():  # a pickled checkpoint, which load_checkpoint allowed
        state = torch.load(pickled, map_location="cpu")
        state = {_plain(model, k): v for k, v in state.items()}
        wanted = _check_keys(path, model, state, {k: list(v.shape) for k, v in state.items()})
        model.load_state_dict({k: state[k] for k in wanted}, strict=False)
        return
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as f:
        saved = {_plain(model, k): k for k in f.keys()}  # noqa: SIM118
        shapes = {k: list(f.get_slice(saved[k]).get_shape()) for k in saved}
        wanted = _check_keys(path, model, saved, shapes)
        model.load_state_dict({k: f.get_tensor(saved[k]) for k in wanted}, strict=False)


def _plain(model: Any, key: str) -> str:
    """A checkpoint key without DDP's `module.` prefix (checkpoints written before bigft
    saved the unwrapped model's names under DDP have it)."""
    if key.startswith("module.") and not hasattr(model, "module"):
        return key[len("module.") :]
    return key


def _load_module(path: Path, src: dict[str, Any], dst: Any) -> None:
    """DeepSpeed's custom_load_fn: load the module part of a DeepSpeed checkpoint."""
    wanted = _check_keys(path, dst, src)
    dst.load_state_dict({k: src[k] for k in wanted}, strict=False)


def _save_fsdp2(accelerator: Accelerator, out: Path) -> None:
    """Accelerate's FSDP2 save_state, with the model's DCP shards filtered to trainable
    tensors (Accelerate writes the whole model and has no option to leave the base out)."""
    import torch.distributed.checkpoint as dcp
    from accelerate.checkpointing import save_accelerator_state
    from accelerate.utils import save_fsdp_optimizer
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    for i, model in enumerate(accelerator._models):
        state = _trainable_only(model, get_model_state_dict(model))
        dcp.save({"model": state}, storage_writer=dcp.FileSystemWriter(str(out / _fsdp_dir(i))))
    plugin = accelerator.state.fsdp_plugin
    for i, optimizer in enumerate(accelerator._optimizers):
        save_fsdp_optimizer(plugin, accelerator, optimizer, accelerator._models[i], str(out), i)
    save_accelerator_state(
        str(out),
        [],
        [],
        accelerator._schedulers,
        accelerator._dataloaders,
        accelerator.process_index,
        accelerator.step,
        accelerator.scaler,
        safe_serialization=True,
    )


def _load_fsdp2(accelerator: Accelerator, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from accelerate.checkpointing import load_accelerator_state
    from accelerate.utils import load_fsdp_optimizer
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    for i, model in enumerate(accelerator._models):
        reader = dcp.FileSystemReader(str(path / _fsdp_dir(i)))
        saved = [k.removeprefix("model.") for k in reader.read_metadata().state_dict_metadata]
        wanted = _check_keys(path, model, saved)
        state = {k: v for k, v in get_model_state_dict(model).items() if k in wanted}
        dcp.load({"model": state}, storage_reader=reader)
        set_model_state_dict(model, state, options=StateDictOptions(strict=False))
    plugin = accelerator.state.fsdp_plugin
    for i, optimizer in enumerate(accelerator._optimizers):
        load_fsdp_optimizer(plugin, accelerator, optimizer, accelerator._models[i], str(path), i)
    restored = load_accelerator_state(
        str(path),
        [],
        [],
        accelerator._schedulers,
        accelerator._dataloaders,
        accelerator.process_index,
        accelerator.scaler,
    )
    accelerator.step = restored.get("step", accelerator.step)


def _fsdp_dir(index: int) -> str:
    return f"pytorch_model_fsdp_{index}"  # Accelerate's name for the model's DCP shards


def _base_fingerprint(accelerator: Accelerator) -> dict[str, Any]:
    """What identifies the frozen base: where it was loaded from, and the names, shapes
    and dtypes of its frozen tensors (cheap: no weight is read)."""
    model = accelerator.unwrap_model(accelerator._models[0])
    frozen = [
        [name, list(getattr(p, "ds_shape", p.shape)), str(p.dtype)]
        for name, p in model.named_parameters()
        if not p.requires_grad
    ]
    source = str(getattr(model, "name_or_path", ""))
    return {
        "name_or_path": os.path.realpath(source) if os.path.isdir(source) else source,
        "frozen_tensors": len(frozen),
        "frozen_layout_sha256": hashlib.sha256(json.dumps(frozen).encode()).hexdigest(),
    }


def _check_base(accelerator: Accelerator, path: Path) -> None:
    """Refuse to put a checkpoint's adapters on another base than they were trained on."""
    file = path / BASE_FILE
    if not file.is_file():  # written before bigft recorded the base
        return
    saved, now = json.loads(file.read_text()), _base_fingerprint(accelerator)
    if saved.get("name_or_path") != now["name_or_path"]:
        raise BigftError(
            f"checkpoint {path} was trained on the base '{saved.get('name_or_path')}' but this "
            f"run loads '{now['name_or_path']}'; resume with model.name_or_path set to the "
            "base it was trained on, or start afresh (train.resume=never)"
        )
    if saved.get("frozen_layout_sha256") != now["frozen_layout_sha256"]:
        raise BigftError(
            f"checkpoint {path} was trained on a base whose {saved.get('frozen_tensors')} "
            f"frozen tensors differ in names, shapes or dtypes from this run's "
            f"{now['frozen_tensors']} (another model.dtype, method or quantization?); resume "
            "with the settings it was written with, or start afresh (train.resume=never)"
        )


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is put straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_like_other_files(folder: Path) -> None:
    """Give files written private (safetensors writes weights through a 0600 temporary
    file) the mode every other file gets under the umask, so a cluster group that can
    read the run can read its weights too."""
    mode = 0o666 & ~current_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)


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
