"""Reading a checkpoint back: checked whole before anything is loaded, the one to resume
chosen, then loaded.

`checkpoint_problem` checks a checkpoint whole: its files are present, trainer_state.json
parses, safetensors headers parse and match the file length, the engines' pickles end where
their zip directory says. `resume: auto` passes over a damaged checkpoint to the newest whole
one (`find_resume`); missing or unreadable RNG states are resumed with a warning, since the
run can go on but no longer matches an uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from bigft.engine.checkpoint import (
    LEFTOVER,
    STATE_FILE,
    checkpoint_root,
    latest_checkpoint,
    list_checkpoints,
)
from bigft.engine.state_files import BASE_FILE, check_keys, fsdp_dir, load_state, plain_key
from bigft.errors import BigftError
from bigft.model.checks import safetensors_problem


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
            match = LEFTOVER.match(path.name)
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
        if not (path / fsdp_dir(0) / ".metadata").is_file():
            return f"{fsdp_dir(0)}/.metadata"
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
        saved = {plain_key(model, k): k for k in f.keys()}  # noqa: SIM118
        shapes = {k: list(f.get_slice(saved[k]).get_shape()) for k in saved}
    check_keys(path, model, saved, shapes)


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
    load_state(accelerator, path)
    return json.loads((path / STATE_FILE).read_text())
