"""`bigft eval`: which config scores which model on which rows.

A run directory is scored with its own resolved config (task, data format, templates,
seq_len) and its exported model; a bare model directory needs `--data` and, for
classification or regression, `--task`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from bigft.config import Config, load_config
from bigft.errors import BigftError

if TYPE_CHECKING:
    from rich.console import Console


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


def run_evaluation(cfg: Config, splits: tuple[str, ...], console: Console) -> dict[str, Any]:
    """`bigft eval`: score cfg.model on the configured validation / test data, no training.

    A classification model's own label names (config.id2label) fix the class ids, so
    labels in the data are matched by name, as they were in training.
    """
    from bigft.data import prepare_data
    from bigft.data.labeled import prepare_labeled
    from bigft.distributed import batch_layout, build_accelerator, world_size_from_env
    from bigft.model import load_model, load_tokenizer
    from bigft.tracking import MetricsLog
    from bigft.train import Run
    from bigft.validation import evaluate_split

    layout = batch_layout(cfg.train, world_size_from_env(), None)
    accelerator = build_accelerator(cfg.train, cfg.parallel, layout)
    tokenizer = load_tokenizer(cfg.model)
    label_names = None
    if cfg.task == "causal_lm":
        data = prepare_data(cfg.data, tokenizer, cfg.train.seq_len, cfg.train.seed)
    else:
        if cfg.task == "classification" and cfg.data.label_names is None:
            cfg.data.label_names = _model_label_names(cfg.model.name_or_path)
        data, label_names = prepare_labeled(
            cfg.data, tokenizer, cfg.train.seq_len, cfg.train.seed, cfg.task
        )
    model = load_model(
        cfg.model, cfg.train.precision, None, cfg.task, label_names, tokenizer.pad_token_id
    )
    model = accelerator.prepare(model)
    run = Run(
        cfg,
        accelerator,
        model,
        tokenizer,
        None,
        None,
        None,  # type: ignore[arg-type]  # no training loader
        data,
        layout,
        0,
        Path(cfg.output_dir),
        MetricsLog(cfg.output_dir, enabled=False),
        console,
        label_names=label_names,
    )
    results = {split: evaluate_split(run, split) for split in splits if getattr(data, split)}
    if not results:
        raise BigftError(f"no {' or '.join(splits)} rows to evaluate: pass --data FILE")
    return results


def _model_label_names(model_dir: str) -> list[str] | None:
    """The class names a classification model was trained with, if it records them."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label)]
    default = [f"LABEL_{i}" for i in range(len(names))]
    return names if len(names) >= 2 and names != default else None
