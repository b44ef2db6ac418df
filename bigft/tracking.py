"""Metrics: one JSON line per record in output_dir/metrics.jsonl (main process only), and
the same scalars sent to experiment trackers (TensorBoard, W&B, MLflow, trackio) through
accelerate's tracking API.

Every tracker writes locally unless the user's environment says otherwise, and a run that
comes back to its output_dir (resume, requeue) keeps logging to the same tracker run.
This module must not import torch or accelerate at import time: `bigft slurm` reads
metrics through it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bigft.config import LoggingConfig
from bigft.errors import BigftError

if TYPE_CHECKING:
    from accelerate import Accelerator

# tracker -> (module it imports, package to pip install)
_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}
# Tracker run ids kept beside the metrics, so a resumed run continues the same runs.
STATE_FILE = "trackers.json"
TENSORBOARD_DIR = "tensorboard"


def finite(value: Any) -> Any:
    """`value` with every NaN / inf float (in nested dicts, lists, tuples) made None:
    JSON has no such numbers, and strict parsers reject Python's `NaN` / `Infinity`."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def strict_json(value: Any, **kwargs: Any) -> str:
    """json.dumps that every JSON parser reads: non-finite floats become null."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)


class MetricsLog:
    """Append-only JSONL metrics; resumed runs keep appending to the same file.

    With an accelerator whose trackers were started (`start_tracking`), every record's
    scalars also go to the trackers: train records as `train/<key>`, evaluation records
    as `<split>/<key>`, at the record's step. The file holds strict JSON (a NaN loss is
    `null`); trackers get the values as they were.

    A checkpoint records the file's length (`size`); resuming from it cuts the file back
    to that length (`truncate`), so whatever the killed run logged after the checkpoint
    (steps, evaluations, the end-of-run records) is logged once, by the resumed run.
    """

    def __init__(
        self, output_dir: str | Path, enabled: bool, accelerator: Accelerator | None = None
    ) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.accelerator = accelerator

    def rewind(self, step: int) -> int:
        """Drop records logged after `step` (a resumed run repeats those steps), so the
        file reads like one uninterrupted run. Returns how many were dropped."""
        if not self.enabled or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record_step = json.loads(line).get("step", 0)
            except ValueError:  # a line cut short by a kill
                dropped += 1
                continue
            if isinstance(record_step, int) and record_step > step:
                dropped += 1
            else:
                kept.append(line + "\n")
        if dropped:
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, self.path)
        return dropped

    def size(self) -> int:
        """The file's length in bytes (0 when absent or on a process that does not log)."""
        if not self.enabled or not self.path.is_file():
            return 0
        return self.path.stat().st_size

    def truncate(self, size: int) -> bool:
        """Cut the file back to its first `size` bytes, as it was when a checkpoint
        recorded that length. False (nothing changed) when the file is shorter, or `size`
        does not fall at the end of a line: then it is not the file the checkpoint saw."""
        if not self.enabled:
            return True
        current = self.size()
        if size > current:
            return False
        if size > 0:
            with self.path.open("rb") as fh:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    return False
        if size < current:
            with self.path.open("r+b") as fh:
                fh.truncate(size)
        return True

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(strict_json(record) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log(tracker_values(record), step=record.get("step"))


def tracker_values(record: dict[str, Any]) -> dict[str, float]:
    """A metrics record's scalars under tracker names: `train/loss`, `validation/eval_loss`."""
    prefix = record.get("split", "train")
    return {
        f"{prefix}/{key}": value
        for key, value in record.items()
        if key not in ("time", "step", "split")
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    }


def resolve_trackers(trackers: Sequence[str]) -> list[str]:
    """The trackers a run starts. 'auto' is TensorBoard when installed, else none; a
    tracker asked for by name whose package is missing is an error, raised before the
    run writes anything (accelerate would silently drop it)."""
    if trackers == "auto":
        return ["tensorboard"] if _installed("tensorboard") else []
    for name in trackers:
        module, package = _PACKAGES[name]
        if not _installed(module):
            raise BigftError(
                f"logging.trackers: {name} needs the package '{package}': "
                f"pip install {package} (or remove {name} from logging.trackers)"
            )
    return list(dict.fromkeys(trackers))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or half-imported package
        return False


def tensorboard_dir(output_dir: str | Path) -> Path:
    """Where TensorBoard event files go: output_dir/tensorboard/<project>/."""
    return Path(output_dir) / TENSORBOARD_DIR


def start_tracking(
    accelerator: Accelerator,
    output_dir: str | Path,
    logging: LoggingConfig,
    config: dict[str, Any],
) -> MetricsLog:
    """The run's MetricsLog, with the accelerator's trackers started.

    `config` (already redacted: it is stored by every tracker) becomes the run's
    hyperparameters, flattened to `section.key` names.
    """
    out = Path(output_dir)
    names = [str(name) for name in accelerator.log_with]
    if names:
        # Only the main process starts trackers; only it reads and writes their ids.
        main = accelerator.is_main_process
        state = _read_state(out) if main else {}
        init_kwargs = _init_kwargs(names, out, logging.run_name, state, main)
        accelerator.init_trackers(logging.project or out.resolve().name, init_kwargs=init_kwargs)
        hparams = flat_hparams(config)
        for tracker in accelerator.trackers:
            # MLflow refuses to change a logged parameter: a continued run keeps its own.
            if tracker.name != "mlflow" or "run_id" not in init_kwargs["mlflow"]:
                tracker.store_init_configuration(hparams)
        if main:
            if "mlflow" in names:
                state["mlflow_run_id"] = accelerator.get_tracker("mlflow", unwrap=True).info.run_id
            (out / STATE_FILE).write_text(json.dumps(state, indent=2))
    return MetricsLog(out, accelerator.is_main_process, accelerator)


def _read_state(out: Path) -> dict[str, Any]:
    path = out / STATE_FILE
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def _init_kwargs(
    names: list[str], out: Path, run_name: str | None, state: dict[str, Any], main: bool
) -> dict[str, dict[str, Any]]:
    """Per-tracker start arguments: local storage, and the ids that make a resumed run
    continue the same tracker run."""
    kwargs: dict[str, dict[str, Any]] = {}
    if "wandb" in names:
        wandb: dict[str, Any] = {
            "dir": str(out),
            "id": state.setdefault("wandb_id", uuid.uuid4().hex[:16]),
            "resume": "allow",
            "name": run_name,
        }
        if "WANDB_MODE" not in os.environ:
            wandb["mode"] = "offline"  # `wandb sync output_dir/wandb/offline-run-*` uploads
        kwargs["wandb"] = wandb
    if "mlflow" in names:
        mlflow_kwargs: dict[str, Any] = {"run_name": run_name}
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:
            # A database in the run directory: MLflow 3 refuses its old ./mlruns file store.
            uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
            mlflow_kwargs["logging_dir"] = (out / "mlartifacts").resolve().as_uri()
            if main:
                import mlflow

                mlflow.set_tracking_uri(uri)
        # A run id only means something to the tracking server that issued it. The URI is
        # kept as a digest: it may carry credentials (https://user:token@host).
        server = hashlib.sha256(uri.encode()).hexdigest()[:16]
        if state.get("mlflow_server") == server and state.get("mlflow_run_id"):
            mlflow_kwargs["run_id"] = state["mlflow_run_id"]
        state["mlflow_server"] = server
        kwargs["mlflow"] = mlflow_kwargs
    if "trackio" in names:
        name = run_name or state.setdefault("trackio_name", f"run-{uuid.uuid4().hex[:8]}")
        kwargs["trackio"] = {"name": name, "resume": "allow"}
    return kwargs


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {'optim.lr': 3e-4, ...}: trackers take flat scalar values (lists
    become their JSON text)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, list):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run (for reports and tests)."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
