"""Resumable checkpoints and the exported model.

A checkpoint directory `checkpoints/step-00000100/` holds what Accelerate saves
(weights, optimizer, scheduler, RNG states of every process) plus `trainer_state.json`
(step, data position, counters). It is written under a `.tmp` name and renamed into
place only when complete, so a kill at any moment leaves the previous checkpoint intact
and `resume: auto` never picks a partial one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from bigft.errors import BigftError

_STEP_DIR = re.compile(r"^step-(\d+)$")
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
    """Write a checkpoint atomically (all processes call this) and prune old ones."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The state file is written last: its presence marks the checkpoint complete.
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore model/optimizer/scheduler/RNG in place; return the trainer state."""
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
