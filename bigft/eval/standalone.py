"""`bigft eval`: which config scores which model on which rows.

A run directory is scored with its own resolved config (task, data format, templates,
seq_len, method) and its exported model, RUN/final: a full model, or a peft adapter
that is loaded onto the run's base (4-bit again for QLoRA). A bare model or adapter
directory needs `--data` and, for classification or regression, `--task`.

`--data FILE` becomes the training split with nothing held out, and that split is
scored (reported as "test"). Declared as a separate test file beside itself as train,
every row would be dropped from test as a duplicate of a training row.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from bigft.config import IMAGE_TASKS, TASK_METRICS, Config, DataConfig
from bigft.config_io import load_config
from bigft.errors import BigftError, DataError, require
from bigft.model.checks import holds_preprocessor

if TYPE_CHECKING:
    from accelerate import Accelerator
    from rich.console import Console

    from bigft.engine.settings import BatchLayout

ADAPTER_CONFIG = "adapter_config.json"  # what peft's save_pretrained writes


class NothingToScore(BigftError):
    """The job's splits hold no rows."""


@dataclass(frozen=True)
class EvalJob:
    """What `bigft eval` scores.

    `file_rows`: the rows of `--data`, prepared as the training split, are scored as the
    test split. `adapter` is a peft adapter directory loaded onto cfg.model; `run_data`
    is the data section a run trained on, whose labels fix a classification adapter's
    class ids. `reference`: the model a run started from (its config's model.name_or_path),
    which task preference's rewards of a fully fine-tuned model compare against.
    """

    cfg: Config
    splits: tuple[str, ...]
    file_rows: bool = False
    adapter: Path | None = None
    run_data: DataConfig | None = None
    reference: str | None = None


@contextmanager
def evaluation_job(
    target: Path, data: str | None, task: str | None, overrides: list[str]
) -> Iterator[EvalJob]:
    """The job for `bigft eval TARGET [--data FILE] [--task T]`, validated.

    A bare model directory is described by a config written to a temporary directory,
    which is removed when the context exits.
    """
    if task is not None and task not in TASK_METRICS:
        raise BigftError(f"--task {task}: unknown task; use one of {', '.join(TASK_METRICS)}")
    if data is not None and not data.startswith("hub:") and not Path(data).expanduser().exists():
        raise BigftError(f"--data {data}: file not found")
    run_dir = _run_of(target)
    if run_dir is not None:
        yield _run_job(run_dir, data, task, overrides)
        return
    with tempfile.TemporaryDirectory(prefix="bigft-eval-") as scratch:
        yield _model_job(target, data, task, overrides, Path(scratch))


def _run_of(target: Path) -> Path | None:
    """The run directory TARGET is, or whose exported adapter it is (an adapter is scored
    with its run's settings: the base, 4-bit or not, and the class names)."""
    if (target / "config.yaml").is_file():
        return target
    parent = target.resolve().parent
    if (target / ADAPTER_CONFIG).is_file() and (parent / "config.yaml").is_file():
        return parent if (parent / "final").resolve() == target.resolve() else None
    return None


def _file_rows(data: str) -> dict[str, Any]:
    """The data section's values that make FILE the whole training split."""
    return {
        "train": str(Path(data).expanduser().resolve()),
        "validation": None,
        "test": None,
        "split": {"train": 1.0, "validation": 0.0, "test": 0.0},
    }


def _as_overrides(values: dict[str, Any], prefix: str) -> list[str]:
    """`key=value` overrides for nested `values`; each value is written as JSON, which
    YAML reads back exactly (a path such as `/runs/a: b` or `/data/null` stays a path)."""
    items: list[str] = []
    for key, value in values.items():
        if isinstance(value, dict):
            items += _as_overrides(value, f"{prefix}{key}.")
        else:
            items.append(f"{prefix}{key}={json.dumps(value)}")
    return items


def _run_job(run_dir: Path, data: str | None, task: str | None, overrides: list[str]) -> EvalJob:
    final = run_dir / "final"
    adapter = (final / ADAPTER_CONFIG).is_file()
    if not adapter and not (final / "config.json").is_file():
        raise BigftError(
            f"{run_dir}: no exported model in {final} (train with checkpoint.export=true, "
            "or pass the model directory itself)"
        )
    values: dict[str, Any] = {"train": {"resume": "never"}, "model": {}}
    if not adapter:  # an adapter goes onto the base the run names
        values["model"]["name_or_path"] = str(final)
    if holds_preprocessor(final):
        values["model"]["tokenizer"] = str(final)  # the tokenizer the run trained with
    if task is not None:
        values["task"] = task
    path, loaded = run_dir / "config.yaml", final if adapter else None
    started = None if adapter else str(load_config(path).model.name_or_path)
    cfg = load_config(path, [*_as_overrides(values, ""), *overrides])
    if data is None:
        return EvalJob(cfg, ("validation", "test"), adapter=loaded, reference=started)
    values["data"] = _file_rows(data)
    scored = load_config(path, [*_as_overrides(values, ""), *overrides])
    return EvalJob(scored, ("test",), True, loaded, cfg.data, started)


def _model_job(
    target: Path, data: str | None, task: str | None, overrides: list[str], scratch: Path
) -> EvalJob:
    adapter = (target / ADAPTER_CONFIG).is_file()
    if not adapter and not (target / "config.json").is_file():
        raise BigftError(f"{target}: neither a bigft run directory nor a model directory")
    if data is None:
        raise BigftError(f"{target} is a model directory: pass --data FILE to score it on")
    model: dict[str, Any] = {"name_or_path": str(target.resolve())}
    method: dict[str, Any] = {}
    if adapter:
        model["name_or_path"] = _adapter_base(target)
        method["name"] = "lora"  # what load_dtype needs to know: a frozen base
        if (target / "tokenizer_config.json").is_file():
            model["tokenizer"] = str(target.resolve())
    config: dict[str, Any] = {
        "task": task or "causal_lm",
        "model": model,
        "method": method,
        "data": _file_rows(data),
        "logging": {"progress_bar": False},
        "output_dir": str(scratch),  # nothing is written: metrics are not logged
    }
    path = scratch / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(path, overrides)
    return EvalJob(cfg, ("test",), True, target if adapter else None)


def _adapter_base(adapter: Path) -> str:
    """The base model an adapter directory was trained on, from its adapter_config.json."""
    file = adapter / ADAPTER_CONFIG
    try:
        base = json.loads(file.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    if not isinstance(base, str) or not base:
        raise BigftError(f"{file}: names no base_model_name_or_path; score its run directory")
    if base.startswith(("/", ".", "~")) and not Path(base).expanduser().is_dir():
        raise BigftError(
            f"{file}: its base model {base} is not there any more; score its run directory, "
            "or restore the base"
        )
    return base


def run_evaluation(job: EvalJob, console: Console) -> dict[str, Any]:
    """`bigft eval`: score the job's model on its splits, no training.

    Class ids follow the names the model was trained with: a full classification
    model's config.id2label, or for an adapter the run's data.label_names or training
    labels; otherwise the labels of the scored rows.
    """
    from bigft.engine.accelerator import build_accelerator, launched, release
    from bigft.engine.settings import batch_layout, world_size_from_env

    cfg = job.cfg
    if cfg.task == "preference" and job.adapter is None and job.reference is None:
        from bigft.preference_losses import needs_reference

        if needs_reference(cfg.preference):
            raise BigftError(
                f"task preference, loss {cfg.preference.loss}: its rewards compare the model "
                "with the reference it was trained against, which a model directory does "
                "not name; score the run directory (its config names the model it started "
                "from)"
            )
    if not launched():
        # The exported model is a plain directory: one process scores it without the
        # DeepSpeed / FSDP2 engine the run trained with (which needs a launcher).
        cfg.parallel.strategy = "ddp"
    layout = batch_layout(cfg.train, world_size_from_env(), None)
    accelerator = build_accelerator(cfg.train, cfg.parallel, layout)
    try:
        return _score(job, accelerator, layout, console)
    finally:
        release(accelerator)


def _score(
    job: EvalJob, accelerator: Accelerator, layout: BatchLayout, console: Console
) -> dict[str, Any]:
    """Load the job's model and data on `accelerator` and evaluate each of its splits."""
    from bigft.chunked_loss import prepare_loss
    from bigft.data.labeled import prepare_for_task
    from bigft.eval.split import evaluate_split
    from bigft.loop.run import EvalContext
    from bigft.model.load import load_configured_model, load_preprocessor, pad_token_id
    from bigft.tracking import MetricsLog

    cfg = job.cfg
    tokenizer = load_preprocessor(cfg)
    if cfg.task in ("classification", "image_classification") and cfg.data.label_names is None:
        cfg.data.label_names = _trained_label_names(job)
    if cfg.task in IMAGE_TASKS:
        from bigft.data.images import prepare_images

        data, label_names = prepare_images(cfg)
    else:
        data, label_names = prepare_for_task(
            cfg.data, tokenizer, cfg.train.seq_len, cfg.train.seed, cfg.task, cfg.preference
        )
    method = cfg.method.name if job.adapter is not None else "full"
    model = load_configured_model(cfg, label_names, pad_token_id(tokenizer), method)
    if job.adapter is not None:
        require("peft", "lora", "scoring an adapter")
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(job.adapter))
    if cfg.task == "causal_lm":  # the loss as training computes it (train.loss_impl)
        prepare_loss(model, cfg.train.loss_impl, cfg.train.loss_chunk)
    if job.file_rows:
        data.validation, data.test = None, data.train
    model = accelerator.prepare(model)
    ctx = EvalContext(
        teacher=_reference(job, label_names, pad_token_id(tokenizer), accelerator),
        cfg=cfg,
        accelerator=accelerator,
        model=model,
        tokenizer=tokenizer,
        data=data,
        layout=layout,
        metrics=MetricsLog(cfg.output_dir, enabled=False),
        console=console,
        label_names=label_names,
    )
    results = {
        split: evaluate_split(ctx, split, step=0) for split in job.splits if getattr(data, split)
    }
    if not results:
        raise NothingToScore(f"no {' or '.join(job.splits)} rows to evaluate: pass --data FILE")
    return results


def _reference(
    job: EvalJob, label_names: list[str] | None, pad_token_id: int | None, accelerator: Any
) -> Any:
    """Task preference, full fine-tuning with a loss that has a reference: the model the
    run started from, frozen and laid out like the scored one (as in training, with
    preference.precompute_reference too); otherwise None."""
    from bigft.preference_losses import needs_reference

    cfg = job.cfg
    if cfg.task != "preference" or job.adapter is not None or job.reference is None:
        return None
    if not needs_reference(cfg.preference):
        return None
    from bigft.loop.setup import load_teacher

    started = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"name_or_path": job.reference}),
            "preference": cfg.preference.model_copy(update={"precompute_reference": False}),
        }
    )
    return load_teacher(started, label_names, pad_token_id, accelerator)


def _trained_label_names(job: EvalJob) -> list[str] | None:
    """The class names in the order the model's head was trained with, when known."""
    if job.adapter is None:
        return _model_label_names(job.cfg.model.name_or_path)
    if job.run_data is None:
        return None
    from bigft.data.labeled import label_names_from

    try:
        return label_names_from(job.run_data)
    except DataError:
        return None  # the training files are gone: the scored rows' labels decide


def _model_label_names(model_dir: str) -> list[str] | None:
    """The class names a classification model was trained with, if it records them."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label)]
    default = [f"LABEL_{i}" for i in range(len(names))]
    return names if len(names) >= 2 and names != default else None
