"""`bigft report` and `bigft compare`: plots and markdown from runs read by
`bigft.report.runs`. matplotlib is imported only to draw, through its Agg canvas and without
pyplot: no global backend is switched and no display is needed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from bigft.errors import BigftError, require
from bigft.report.runs import (
    MISSING,
    Point,
    Run,
    at_text,
    config_diff,
    eval_metrics,
    eval_rows,
    fmt,
    load_run,
    lower_is_better,
    memory_measure,
    numeric_keys,
    run_facts,
    series,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Training keys with a panel of their own; keys naming memory share one panel.
TRAIN_PANELS = {
    "lr": ("learning rate", "lr"),
    "tokens_per_s": ("throughput", "tokens/s"),
    "grad_norm": ("gradient norm", "grad norm"),
}


PANEL_INCHES = (6.4, 3.6)


DPI = 100


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
    log_y: bool = False

    def values(self) -> list[float]:
        """Every finite value of every line."""
        return [v for line in self.series for v in line.values if math.isfinite(v)]


@dataclass
class Grid:
    """A table rendered both to the terminal (rich) and to markdown."""

    title: str
    header: list[str]
    rows: list[list[str]]


def report_panels(run: Run) -> list[Panel]:
    """Loss (training, with evaluation loss on the same step axis), lr, throughput,
    gradient norm, memory, any other training key, and each other evaluation metric."""
    panels = []
    steps, losses = series(run.train, "loss")
    loss = [Series("train loss", steps, losses, "C0")]
    for i, (split, records) in enumerate(run.evals.items(), start=1):
        e_steps, e_values = series(records, "eval_loss")
        loss.append(Series(f"{split} eval_loss", e_steps, e_values, f"C{i}", markers=True))
    panels.append(_log_if_wide(Panel("loss", "loss", "loss", loss)))
    train_keys = [k for k in numeric_keys(run.train) if k != "loss"]
    memory = [k for k in train_keys if "mem" in k]
    for key in train_keys:
        if key in memory:
            continue
        title, ylabel = TRAIN_PANELS.get(key, (key, key))
        lines = [Series(key, *series(run.train, key), "C0")]
        panels.append(_log_if_wide(Panel(_file_stem(key), title, ylabel, lines)))
    if memory:
        lines = [Series(k, *series(run.train, k), f"C{i}") for i, k in enumerate(memory)]
        panels.append(Panel("memory", memory_measure(run), "MiB (busiest process)", lines))
    metrics: dict[str, None] = {}
    for records in run.evals.values():
        metrics.update(dict.fromkeys(m for m in eval_metrics(records) if m != "eval_loss"))
    for metric in metrics:
        lines = [
            Series(split, *series(records, metric), f"C{i}", markers=True)
            for i, (split, records) in enumerate(run.evals.items(), start=1)
        ]
        panels.append(_log_if_wide(Panel(_file_stem(metric), metric, metric, lines)))
    return [p for p in panels if any(s.steps for s in p.series)]


def _log_if_wide(panel: Panel) -> Panel:
    """A loss (or perplexity) that spans more than a decade is drawn on a log scale: a
    linear axis would flatten everything after the first steps."""
    words = set(re.split(r"[^a-z0-9]+", panel.name.lower()))
    values = panel.values()
    if words & {"loss", "ppl", "perplexity"} and values and min(values) > 0:
        panel.log_y = max(values) / min(values) > 10
    return panel


def split_constant(panels: list[Panel]) -> tuple[list[Panel], list[str]]:
    """(panels worth drawing, `title value` of each left out): a panel other than the loss
    whose every logged value is the same (skipped_steps at 0, a constant lr) says no more
    than one number."""
    drawn, constant = [], []
    for panel in panels:
        values = panel.values()
        if panel.name != "loss" and len(values) > 1 and len(set(values)) == 1:
            constant.append(f"{panel.title} {fmt(values[0])}")
        else:
            drawn.append(panel)
    return drawn, constant


def compare_panels(runs: list[Run], names: list[str], metric: str, split: str) -> list[Panel]:
    """Training loss and one evaluation metric, a line per run in the same colour on both."""
    loss, evals = [], []
    for i, (run, name) in enumerate(zip(runs, names, strict=True)):
        loss.append(Series(name, *series(run.train, "loss"), f"C{i}"))
        evals.append(Series(name, *series(run.evals.get(split, []), metric), f"C{i}", True))
    return [
        _log_if_wide(Panel("loss", "train loss", "loss", loss)),
        _log_if_wide(Panel(_file_stem(metric), f"{split} {metric}", metric, evals)),
    ]


def _file_stem(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key) or "metric"


def draw(panels: list[Panel], path: Path) -> Path:
    """Draw panels side by side into one PNG."""
    figure(panels).savefig(path, dpi=DPI)
    return path


def figure(panels: list[Panel]) -> Figure:
    """Panels side by side on one matplotlib Figure (Agg canvas)."""
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
        ax.set_ylabel(f"{panel.ylabel} (log scale)" if panel.log_y else panel.ylabel)
        if panel.log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len(panel.series) > 1:
            ax.legend(fontsize="small")
    return fig


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Plots and report.md for one run (default: RUN_DIR/report); returns report.md."""
    run = load_run(run_dir)
    require("matplotlib", "track", "bigft report")  # before anything is written
    out = _make_dir(Path(out_dir) if out_dir is not None else run.path / "report")
    panels, constant = split_constant(report_panels(run))
    images = [draw([p], out / f"{p.name}.png").name for p in panels]
    path = out / "report.md"
    path.write_text(report_markdown(run, images, constant), encoding="utf-8")
    return path


def report_markdown(run: Run, images: list[str], constant: list[str] | None = None) -> str:
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
    if constant:
        parts.append(f"Not plotted, the same at every logged step: {'; '.join(constant)}.")
    return "\n\n".join(parts) + "\n"


def _best_cells(best: Point | None) -> list[str]:
    return [MISSING, MISSING] if best is None else [fmt(best.value), str(best.step)]


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
    """Each run's shortest path suffix that no other run's path ends with: `lr-1e-4` and
    `lr-2e-4`, or `a/out` and `b/out` for runs/a/out and runs/b/out. The same directory
    given twice is numbered."""
    paths = [r.path.resolve().parts for r in runs]
    names = []
    for i, parts in enumerate(paths):
        others = [p for j, p in enumerate(paths) if j != i]
        size = next(
            (k for k in range(1, len(parts)) if all(p[-k:] != parts[-k:] for p in others)),
            len(parts),
        )
        names.append(str(Path(*parts[-size:])))
    twice = {name for name in names if names.count(name) > 1}
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in twice:
            seen[name] = seen.get(name, 0) + 1
            names[i] = f"{name} ({seen[name]})"
    return names


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
        rows.append([f"{label} final", *(at_text(f[0]) if f else MISSING for f in found)])
        rows.append([f"{label} best", *(at_text(f[1]) if f else MISSING for f in found)])
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
