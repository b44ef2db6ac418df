"""A run directory read as plain files (config.yaml as YAML, not through the config models,
so a report also works for a run made by an older or newer bigft): its metrics per step,
facts, best and final points, and config differences between runs.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bigft.errors import BigftError

# A metric whose name holds one of these words is better when lower; any other when higher
# (accuracy, f1, auc, exact_match).
LOWER_IS_BETTER = frozenset(
    {"loss", "ppl", "perplexity", "nll", "mse", "rmse", "mae", "mape", "error", "err", "wer", "cer"}
)


# Bookkeeping keys of a record: never plotted or ranked.
NOT_METRICS = frozenset({"time", "step", "split", "epoch"})


MISSING = "-"


@dataclass
class Run:
    """One run directory, read: the last record per (step, split), in step order."""

    path: Path
    name: str
    config: dict[str, Any]
    summary: dict[str, Any]
    train: list[dict[str, Any]]
    evals: dict[str, list[dict[str, Any]]]  # split name -> evaluation records
    skipped_lines: int = 0
    best_checkpoint: dict[str, Any] | None = None


@dataclass(frozen=True)
class Point:
    """A metric value and the step it was logged at."""

    step: int
    value: float


def load_run(run_dir: str | Path) -> Run:
    """Read a run's files; only metrics.jsonl is required."""
    path = Path(run_dir)
    if not path.exists():
        raise BigftError(f"run directory '{path}' does not exist")
    if not path.is_dir():
        raise BigftError(f"'{path}' is not a directory (give a run's output_dir)")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise BigftError(f"'{path}' has no metrics.jsonl: is it a bigft run's output_dir?")
    records, skipped = _read_jsonl(metrics)
    if not records:
        raise BigftError(f"'{metrics}' holds no records yet: nothing to report")
    train, evals = latest_per_step(records)
    config = _read_mapping(path / "config.yaml", yaml.safe_load)
    best = _read_mapping(path / "checkpoints" / "best.json", json.loads)
    return Run(
        path=path,
        name=path.resolve().name,
        config=config,
        summary=_read_mapping(path / "summary.json", json.loads),
        train=train,
        evals=evals,
        skipped_lines=skipped,
        best_checkpoint=best or None,
    )


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records and the number of unreadable lines (a kill can cut the last line short)."""
    records, skipped = [], 0
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # not JSON, or not UTF-8
            skipped += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped += 1
    if skipped and not records:
        raise BigftError(f"'{path}' holds no JSON records: is it a bigft metrics file?")
    return records, skipped


def _read_mapping(path: Path, parse: Any) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BigftError(f"'{path}' cannot be parsed: {first}") from None
    return data if isinstance(data, dict) else {}


def latest_per_step(
    records: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Training records and evaluation records per split, the last one per step.

    A resumed run appends to the same metrics.jsonl, so the steps between its checkpoint
    and the interruption are logged twice; the later record is the one the run continued
    from. Records without a split are training records.
    """
    latest: dict[tuple[str | None, int], dict[str, Any]] = {}
    for record in records:
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        split = record.get("split")
        latest[(None if split is None else str(split), step)] = record
    ordered = sorted(latest.items(), key=lambda item: item[0][1])
    train = [r for (split, _), r in ordered if split is None]
    evals: dict[str, list[dict[str, Any]]] = {}
    for (split, _), record in ordered:
        if split is not None:
            evals.setdefault(split, []).append(record)
    # validation first: it is the split runs are judged and compared on
    names = sorted(evals, key=lambda s: (s != "validation", s))
    return train, {name: evals[name] for name in names}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of one key, over the records that hold a number for it."""
    points = [(r["step"], float(r[key])) for r in records if _is_number(r.get(key))]
    return [s for s, _ in points], [v for _, v in points]


def numeric_keys(records: list[dict[str, Any]]) -> list[str]:
    """Metric keys in the order they first appear."""
    seen: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key not in NOT_METRICS and _is_number(value):
                seen.setdefault(key)
    return list(seen)


def eval_metrics(records: list[dict[str, Any]]) -> list[str]:
    """Evaluation metrics, eval_loss first; token and sample counts are not metrics."""
    keys = [k for k in numeric_keys(records) if not k.endswith(("tokens", "samples"))]
    return sorted(keys, key=lambda k: k != "eval_loss")


def lower_is_better(metric: str) -> bool:
    """min for loss, perplexity and error-like metrics; max for accuracy, f1, auc, ..."""
    return any(word in LOWER_IS_BETTER for word in re.split(r"[^a-z0-9]+", metric.lower()))


def final_point(steps: list[int], values: list[float]) -> Point | None:
    return Point(steps[-1], values[-1]) if steps else None


def best_point(metric: str, steps: list[int], values: list[float]) -> Point | None:
    """The best finite value (the earliest step on ties); None if there is none."""
    points = [Point(s, v) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
    if not points:
        return None
    if lower_is_better(metric):
        return min(points, key=lambda p: (p.value, p.step))
    return max(points, key=lambda p: (p.value, -p.step))


def run_facts(run: Run) -> dict[str, str]:
    """What the run was and how it went, as labelled strings."""
    cfg = run.config
    steps, losses = series(run.train, "loss")
    _, speeds = series(run.train, "tokens_per_s")
    last = final_point(steps, losses)
    done = run.summary.get("steps", steps[-1] if steps else None)
    facts = {
        "model": str(_dig(cfg, "model.name_or_path", MISSING)),
        "method": str(_dig(cfg, "method.name", MISSING)),
        "strategy": str(_dig(cfg, "parallel.strategy", MISSING)),
        "steps": fmt(done) + ("" if run.summary else " (unfinished: no summary.json)"),
        "final train loss": at_text(last),
        "mean tokens/s": fmt(sum(speeds) / len(speeds)) if speeds else MISSING,
    }
    if "global_batch_size" in run.summary:
        facts["global batch size"] = fmt(run.summary["global_batch_size"])
    if "world_size" in run.summary:
        facts["processes"] = fmt(run.summary["world_size"])
    if run.summary.get("final_model"):
        facts["exported model"] = str(run.summary["final_model"])
    if run.best_checkpoint:
        facts["best checkpoint"] = _best_checkpoint_text(run.best_checkpoint)
    return facts


def memory_measure(run: Run) -> str:
    """What `mem_mib` measured in this run: peak CUDA memory allocated by tensors on a
    GPU, peak resident memory of the process on CPU (the busiest process, in MiB). The
    device is read from summary.json when the run recorded it; otherwise both are named."""
    engine = run.summary.get("engine")
    engine = engine if isinstance(engine, dict) else {}
    device = str(run.summary.get("device") or engine.get("device") or "")
    if device.startswith("cuda"):
        return "peak GPU memory allocated"
    if device == "cpu" or engine.get("distributed_type") == "MULTI_CPU":
        return "peak process RSS (CPU)"
    return "peak memory (GPU allocated on CUDA, process RSS on CPU)"


def _best_checkpoint_text(info: dict[str, Any]) -> str:
    """checkpoints/best.json as `step-00000020 (eval_loss 1.9 at step 20)`."""
    if {"checkpoint", "metric", "value", "step"} <= info.keys():
        what = f"{info['metric']} {fmt(info['value'])} at step {info['step']}"
        return f"{info['checkpoint']} ({what})"
    shown = {k: v for k, v in info.items() if not isinstance(v, dict | list)}
    return ", ".join(f"{k} {fmt(v)}" for k, v in shown.items())


def eval_rows(run: Run) -> list[tuple[str, str, Point, Point | None]]:
    """(split, metric, final, best) for every evaluation metric of every split."""
    rows = []
    for split, records in run.evals.items():
        for metric in eval_metrics(records):
            steps, values = series(records, metric)
            last = final_point(steps, values)
            if last is not None:
                rows.append((split, metric, last, best_point(metric, steps, values)))
    return rows


def _dig(tree: dict[str, Any], dotted: str, default: Any) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def fmt(value: Any) -> str:
    """Six significant digits: losses are logged to six decimals, throughput to one."""
    if value is None:
        return MISSING
    if _is_number(value) and isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def at_text(point: Point | None) -> str:
    return MISSING if point is None else f"{fmt(point.value)} (step {point.step})"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys: {"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def config_diff(configs: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """Dotted keys whose values differ between configs, each value shown; output_dir aside
    (it always differs). A key one config lacks shows as '-'."""
    flats = [flatten(c) for c in configs]
    keys = sorted({k for f in flats for k in f} - {"output_dir"})
    absent = object()
    diff = []
    for key in keys:
        values = [f.get(key, absent) for f in flats]
        if any(v != values[0] for v in values[1:]):
            diff.append((key, [MISSING if v is absent else show_value(v) for v in values]))
    return diff


def show_value(value: Any) -> str:
    """A config value as YAML would spell it, on one line."""
    if value is None or isinstance(value, bool | list | dict):
        return json.dumps(value)
    if isinstance(value, str) and (not value or any(c in value for c in "\n\t\r")):
        return json.dumps(value)
    return str(value)
