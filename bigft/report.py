"""`bigft report` and `bigft compare`: plots and markdown made from run directories.

A run directory is read as plain files (config.yaml as YAML, not through the config
models), so a report also works for a run made by an older or newer bigft. matplotlib is
imported only to draw, through its Agg canvas and without pyplot: no global backend is
switched and no display is needed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bigft.errors import BigftError, require

# A metric whose name holds one of these words is better when lower; any other when higher
# (accuracy, f1, auc, exact_match).
LOWER_IS_BETTER = frozenset(
    {"loss", "ppl", "perplexity", "nll", "mse", "rmse", "mae", "mape", "error", "err", "wer", "cer"}
)
# Bookkeeping keys of a record: never plotted or ranked.
NOT_METRICS = frozenset({"time", "step", "split", "epoch"})
# Training keys with a panel of their own; keys naming memory share one panel.
TRAIN_PANELS = {
    "lr": ("learning rate", "lr"),
    "tokens_per_s": ("throughput", "tokens/s"),
    "grad_norm": ("gradient norm", "grad norm"),
}
PANEL_INCHES = (6.4, 3.6)
DPI = 100
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


@dataclass
class Series:
    """One line of a panel."""

    label: str
    steps: list[int]
    values: list[float]
    color: str
    markers: bool = False  # evaluations: few points, each one drawn


@dataclass
class Panel:
    """One set of axes: its file stem, title, y label and lines."""

    name: str
    title: str
    ylabel: str
    series: list[Series]


@dataclass
class Grid:
    """A table rendered both to the terminal (rich) and to markdown."""

    title: str
    header: list[str]
    rows: list[list[str]]


# ---------------------------------------------------------------------------- reading


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


# ---------------------------------------------------------------------------- metrics


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
        "final train loss": _at(last),
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


def _at(point: Point | None) -> str:
    return MISSING if point is None else f"{fmt(point.value)} (step {point.step})"


# ---------------------------------------------------------------------------- config diff


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


# ---------------------------------------------------------------------------- panels


def report_panels(run: Run) -> list[Panel]:
    """Loss (training, with evaluation loss on the same step axis), lr, throughput,
    gradient norm, memory, any other training key, and each other evaluation metric."""
    panels = []
    steps, losses = series(run.train, "loss")
    loss = [Series("train loss", steps, losses, "C0")]
    for i, (split, records) in enumerate(run.evals.items(), start=1):
        e_steps, e_values = series(records, "eval_loss")
        loss.append(Series(f"{split} eval_loss", e_steps, e_values, f"C{i}", markers=True))
    panels.append(Panel("loss", "loss", "loss", loss))
    train_keys = [k for k in numeric_keys(run.train) if k != "loss"]
    memory = [k for k in train_keys if "mem" in k]
    for key in train_keys:
        if key in memory:
            continue
        title, ylabel = TRAIN_PANELS.get(key, (key, key))
        panels.append(
            Panel(_file_stem(key), title, ylabel, [Series(key, *series(run.train, key), "C0")])
        )
    if memory:
        lines = [Series(k, *series(run.train, k), f"C{i}") for i, k in enumerate(memory)]
        panels.append(Panel("memory", "memory", "MiB", lines))
    metrics: dict[str, None] = {}
    for records in run.evals.values():
        metrics.update(dict.fromkeys(m for m in eval_metrics(records) if m != "eval_loss"))
    for metric in metrics:
        lines = [
            Series(split, *series(records, metric), f"C{i}", markers=True)
            for i, (split, records) in enumerate(run.evals.items(), start=1)
        ]
        panels.append(Panel(_file_stem(metric), metric, metric, lines))
    return [p for p in panels if any(s.steps for s in p.series)]


def compare_panels(runs: list[Run], names: list[str], metric: str, split: str) -> list[Panel]:
    """Training loss and one evaluation metric, a line per run in the same colour on both."""
    loss, evals = [], []
    for i, (run, name) in enumerate(zip(runs, names, strict=True)):
        loss.append(Series(name, *series(run.train, "loss"), f"C{i}"))
        evals.append(Series(name, *series(run.evals.get(split, []), metric), f"C{i}", True))
    return [
        Panel("loss", "train loss", "loss", loss),
        Panel(_file_stem(metric), f"{split} {metric}", metric, evals),
    ]


def _file_stem(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key) or "metric"


def draw(panels: list[Panel], path: Path) -> Path:
    """Draw panels side by side into one PNG."""
    require("matplotlib", "track", "drawing plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = PANEL_INCHES
    fig = Figure(figsize=(width * len(panels), height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for line in panel.series:
            ax.plot(
                line.steps,
                line.values,
                label=line.label,
                color=line.color,
                marker="o" if line.markers else None,
                markersize=4,
                linewidth=1.0 if line.markers else 1.5,
            )
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if len(panel.series) > 1:
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=DPI)
    return path


# ---------------------------------------------------------------------------- report


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Plots and report.md for one run (default: RUN_DIR/report); returns report.md."""
    run = load_run(run_dir)
    require("matplotlib", "track", "bigft report")  # before anything is written
    out = _make_dir(Path(out_dir) if out_dir is not None else run.path / "report")
    images = [draw([p], out / f"{p.name}.png").name for p in report_panels(run)]
    path = out / "report.md"
    path.write_text(report_markdown(run, images), encoding="utf-8")
    return path


def report_markdown(run: Run, images: list[str]) -> str:
    """report.md: what the run was, final and best evaluations, the plots."""
    facts = run_facts(run)
    parts = [f"# Run report: {run.name}", f"Run directory: `{run.path}`"]
    parts.append(_markdown(Grid("", ["", ""], [[k, v] for k, v in facts.items()])))
    rows = [
        [split, metric, fmt(last.value), str(last.step), *_best_cells(best)]
        for split, metric, last, best in eval_rows(run)
    ]
    parts.append("## Evaluation")
    if rows:
        header = ["split", "metric", "final", "step", "best", "best step"]
        parts.append(_markdown(Grid("", header, rows)))
        parts.append(
            "Best is the lowest value for loss, perplexity and error metrics, the "
            "highest for the others."
        )
    else:
        parts.append("No evaluations were logged (set `eval.every_steps` or a validation split).")
    if run.skipped_lines:
        parts.append(
            f"{run.skipped_lines} line(s) of metrics.jsonl were not JSON and were skipped."
        )
    parts.append("## Plots")
    parts.extend(f"![{Path(name).stem}]({name})" for name in images)
    return "\n\n".join(parts) + "\n"


def _best_cells(best: Point | None) -> list[str]:
    return [MISSING, MISSING] if best is None else [fmt(best.value), str(best.step)]


# ---------------------------------------------------------------------------- compare


def compare_runs(
    run_dirs: list[Path], out_dir: str | Path, metric: str, console: Console
) -> tuple[Path, Path]:
    """Print the comparison tables; write compare.md and compare.png. Returns both paths."""
    if len(run_dirs) < 2:
        raise BigftError("compare needs at least two run directories")
    runs = [load_run(d) for d in run_dirs]
    names = run_names(runs)
    metric, split = resolve_metric(runs, metric)
    require("matplotlib", "track", "bigft compare")
    grids, notes = compare_grids(runs, names, metric, split)
    for grid in grids:
        table = Table(title=grid.title, title_justify="left")
        for column in grid.header:
            table.add_column(column)
        for row in grid.rows:
            table.add_row(*(Text(cell) for cell in row))
        console.print(table)
    for note in notes:
        console.print(note, highlight=False, markup=False, soft_wrap=True)
    out = _make_dir(Path(out_dir))
    image = draw(compare_panels(runs, names, metric, split), out / "compare.png")
    parts = ["# Run comparison"]
    for grid in grids:
        parts += [f"## {grid.title}", _markdown(grid)]
    parts += notes
    parts.append(f"![train loss and {split} {metric}]({image.name})")
    md = out / "compare.md"
    md.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return md, image


def run_names(runs: list[Run]) -> list[str]:
    """Directory names; parent/name where two runs share a name."""
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return names
    return [f"{r.path.resolve().parent.name}/{r.name}" for r in runs]


def resolve_metric(runs: list[Run], metric: str) -> tuple[str, str]:
    """The metric as logged (`accuracy` finds `eval_accuracy`) and the split to read it
    from: validation when any run has it there."""
    logged: dict[str, set[str]] = {}
    for run in runs:
        for split, records in run.evals.items():
            for key in eval_metrics(records):
                logged.setdefault(key, set()).add(split)
    for name in (metric, f"eval_{metric}"):
        if name in logged:
            splits = logged[name]
            return name, "validation" if "validation" in splits else sorted(splits)[0]
    known = ", ".join(sorted(logged)) or "none"
    raise BigftError(f"no run logged the metric '{metric}' (logged: {known})")


def compare_grids(
    runs: list[Run], names: list[str], metric: str, split: str
) -> tuple[list[Grid], list[str]]:
    """The results table, the config differences, and notes (best run, missing files)."""
    facts = [run_facts(r) for r in runs]
    labels = ("steps", "final train loss", "mean tokens/s")
    rows = [[label, *(f[label] for f in facts)] for label in labels]
    per_run = [{(s, m): (last, best) for s, m, last, best in eval_rows(r)} for r in runs]
    keys: dict[tuple[str, str], None] = {}
    for logged in per_run:
        keys.update(dict.fromkeys(logged))
    # the compared metric first, then validation before the other splits
    order = sorted(keys, key=lambda k: (k != (split, metric), k[0] != "validation"))
    for split_name, name in order:
        label = f"{split_name} {name}"
        found = [p.get((split_name, name)) for p in per_run]
        rows.append([f"{label} final", *(_at(f[0]) if f else MISSING for f in found)])
        rows.append([f"{label} best", *(_at(f[1]) if f else MISSING for f in found)])
    grids = [Grid("results", ["", *names], rows)]
    notes = []
    bests = {
        n: p[(split, metric)][1]
        for p, n in zip(per_run, names, strict=True)
        if (split, metric) in p
    }
    ranked = [(point, n) for n, point in bests.items() if point is not None]
    if ranked:
        pick = min if lower_is_better(metric) else max
        point, winner = pick(ranked, key=lambda item: item[0].value)
        notes.append(f"best {split} {metric}: {winner}, {fmt(point.value)} at step {point.step}")
    diff = config_diff([r.config for r in runs])
    if diff:
        grids.append(Grid("config differences", ["key", *names], [[k, *v] for k, v in diff]))
    else:
        notes.append("configs: no differences (output_dir aside)")
    notes += [f"{n}: no config.yaml" for r, n in zip(runs, names, strict=True) if not r.config]
    return grids, notes


# ---------------------------------------------------------------------------- output


def _markdown(grid: Grid) -> str:
    def row(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [row(grid.header), "|" + "---|" * len(grid.header)]
    return "\n".join(lines + [row(r) for r in grid.rows])


def _make_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BigftError(f"cannot create '{path}' ({exc.strerror or exc})") from None
    return path
