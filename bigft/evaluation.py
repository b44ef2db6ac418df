"""`bigft eval`: which config scores which model on which rows.

A run directory is scored with its own resolved config (task, data format, templates,
seq_len) and its exported model; a bare model directory needs `--data` and, for
classification or regression, `--task`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

from bigft.config import Config, load_config
from bigft.errors import BigftError


def evaluation_config(
    target: Path, data: str | None, task: str | None, overrides: list[str]
) -> tuple[Config, tuple[str, ...]]:
    """(config, splits to score) for `bigft eval TARGET [--data FILE] [--task T]`."""
    if (target / "config.yaml").is_file():
        model = target / "final"
        if not (model / "config.json").is_file():
            raise BigftError(
                f"{target}: no exported model in {model} (train with checkpoint.export=true, "
                "or pass the model directory itself)"
            )
        extra = [f"model.name_or_path={model}", "train.resume=never"]
        if task is not None:
            extra.append(f"task={task}")
        if data is not None:
            rows = Path(data).resolve()
            extra += [f"data.train={rows}", f"data.test={rows}", "data.validation=null"]
            extra += ["data.split.train=1.0", "data.split.validation=0", "data.split.test=0"]
        cfg = load_config(target / "config.yaml", [*extra, *overrides])
        return cfg, ("test",) if data is not None else ("validation", "test")
    if not (target / "config.json").is_file():
        raise BigftError(f"{target}: neither a bigft run directory nor a model directory")
    if data is None:
        raise BigftError(f"{target} is a model directory: pass --data FILE to score it on")
    scratch = Path(tempfile.mkdtemp(prefix="bigft-eval-"))
    config: dict[str, Any] = {
        "task": task or "causal_lm",
        "model": {"name_or_path": str(target.resolve())},
        "data": {
            "train": str(Path(data).resolve()),
            "test": str(Path(data).resolve()),
            "split": {"train": 1.0, "validation": 0.0, "test": 0.0},
        },
        "logging": {"progress_bar": False},
        "output_dir": str(scratch),
    }
    path = scratch / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path, overrides), ("test",)
