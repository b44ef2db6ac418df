"""The output directory's file system: writable, room for a checkpoint, permissions like
the files around it.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bigft.errors import BigftError


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
