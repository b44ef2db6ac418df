"""Sweeps: `--grid key=v1,v2` expanded to one config per task of a job array; a sweep adds
`configs/task-NNN.yaml` and `sweep.json`, and trains task i into `<output_dir>/task-NNN/`.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bigft.config_io import dump_config
from bigft.config_yaml import parse_override
from bigft.errors import BigftError, ConfigError
from bigft.slurm.job import (
    launch_files,
    load_job_config,
    render_script,
    slurm_filename,
    write_job_files,
)
from bigft.slurm.queue import last_job, query_states, run_progress

if TYPE_CHECKING:
    pass


def _grid_value(key: str, text: str) -> tuple[str, Any]:
    """A grid value as the config will read it, so `1e-4` and `0.0001` are one value
    (tagged with its kind: `true` and `1` are not)."""
    value = parse_override(f"{key}={text}")[1]
    if isinstance(value, str):
        try:
            value = float(value)  # YAML reads 1e-4 (no dot) as text; the config a float
        except ValueError:
            return "text", value
    if isinstance(value, bool) or value is None:
        return "constant", value
    if isinstance(value, int | float):
        return "number", float(value)
    return "structure", json.dumps(value, sort_keys=True, default=str)


def expand_grid(grids: list[str]) -> list[list[str]]:
    """['optim.lr=1e-4,2e-4', 'train.seed=1,2'] -> the 4 override lists of the product.

    Refused: output_dir (every point trains in its own `<output_dir>/task-NNN`), slurm.*
    (all points run in one job array with one request), a key given twice, a value
    listed twice (two identical runs).
    """
    axes = []
    keys: set[str] = set()
    for item in grids:
        parse_override(item)  # validates the key=value shape
        key, _, values = item.partition("=")
        if key == "output_dir":
            raise ConfigError(
                f"--grid {item}: each grid point already trains in its own run directory "
                "(<output_dir>/task-NNN); set output_dir once, as the sweep's directory"
            )
        if key.split(".")[0] == "slurm":
            raise ConfigError(
                f"--grid {item}: all grid points run in one Slurm job array with one "
                f"request; set {key} once (or submit separate sweeps)"
            )
        if key in keys:
            raise ConfigError(f"--grid {key} is given twice; list all its values in one --grid")
        keys.add(key)
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not choices:
            raise ConfigError(f"--grid {item}: no values (expected key=v1,v2,...)")
        seen: dict[tuple[str, Any], str] = {}
        for choice in choices:
            value = _grid_value(key, choice)
            if value in seen:
                same = "" if seen[value] == choice else f" ({seen[value]} and {choice} are equal)"
                raise ConfigError(
                    f"--grid {item}: {key}={choice} is listed twice{same}; each grid point "
                    "would run twice"
                )
            seen[value] = choice
        axes.append([f"{key}={v}" for v in choices])
    return [list(point) for point in itertools.product(*axes)]


def prepare_sweep(
    config: Path,
    overrides: list[str],
    grids: list[str],
    flags: dict[str, Any],
    max_parallel: int | None = None,
) -> tuple[Path, int]:
    """Validate every grid point's config, write them, render one array script."""
    base = load_job_config(config, overrides, flags)
    job_dir = Path(base.output_dir) / "slurm"
    files, tasks = launch_files(base.slurm, config.resolve().parent), []
    for i, point in enumerate(expand_grid(grids)):
        out = Path(base.output_dir) / f"task-{i:03d}"
        cfg = load_job_config(config, [*overrides, *point, f"output_dir={out}"], flags)
        name = f"configs/task-{i:03d}.yaml"
        files[name] = dump_config(cfg)
        tasks.append({"task": i, "overrides": point, "output_dir": str(out), "config": name})
    files["sweep.json"] = json.dumps({"grid": grids, "tasks": tasks}, indent=2)
    files["job.sbatch"] = render_script(
        base,
        source=str(config),
        config="",
        node_script=str(job_dir / "node.sh"),
        log_path=slurm_filename(job_dir) + "/job-%A_%a.out",
        accelerate_config=str(job_dir / "accelerate.yaml") if "accelerate.yaml" in files else None,
        array=f"0-{len(tasks) - 1}" + (f"%{max_parallel}" if max_parallel else ""),
        configs_dir=str(job_dir / "configs"),
    )
    write_job_files(job_dir, files)
    return job_dir / "job.sbatch", len(tasks)


def sweep_rows(run_dir: Path) -> list[dict[str, Any]]:
    """One row per sweep task: overrides, Slurm state, progress, final eval loss."""
    sweep_path = run_dir / "slurm" / "sweep.json"
    if not sweep_path.is_file():
        raise BigftError(f"{run_dir}: not a sweep ({sweep_path} missing)")
    tasks = json.loads(sweep_path.read_text())["tasks"]
    job = last_job(run_dir)
    states = query_states(job["job_id"])
    rows = []
    for task in tasks:
        task_id = f"{job['job_id']}_{task['task']}"
        state = states.get(task_id, {}).get("state", "?")
        rows.append(
            {**task, "job_id": task_id, "state": state, **run_progress(Path(task["output_dir"]))}
        )
    return rows
