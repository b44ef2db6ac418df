"""A Slurm job from the config: the sbatch script rendered from the template, the files the
job reads, prepared in `<output_dir>/slurm/`.

A job is prepared in `<output_dir>/slurm/`: the resolved config it trains (frozen, so
editing the YAML later changes nothing in a queued job), a copy of the per-node entry
script (`node.sh`), of the accelerate config if one is used (`accelerate.yaml`), the
rendered `job.sbatch`, `job.json` (job ids) and the job's log.

The template, the node script and the accelerate configs are installed with bigft, in
`bigft/templates/` (read through importlib.resources); `slurm/` and `launch/` at the top of
the repository hold identical copies for reading.
"""

from __future__ import annotations

import os
import shlex
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from bigft import __version__
from bigft.config import Config, SlurmConfig
from bigft.config_io import dump_config, is_secret_name, load_config
from bigft.engine.launcher import checkout_on_path
from bigft.errors import BigftError, ConfigError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


TEMPLATE = "slurm/job.sbatch.j2"


NODE_SCRIPT = "launch/slurm_node.sh"


ACCELERATE_CONFIGS = "launch/accelerate"


# The signal asked for with --signal; a stop caused by it means "requeue me".
REQUEUE_SIGNAL = "SIGUSR1"


def shipped(path: str) -> Traversable:
    """A file installed with bigft: `bigft/templates/<path>`, e.g. 'launch/slurm_node.sh'."""
    found = resources.files("bigft") / "templates"
    for part in path.split("/"):
        found = found / part
    return found


def _read_shipped(path: str) -> str:
    try:
        return shipped(path).read_text()
    except OSError:
        raise BigftError(f"bigft is missing its file {path} (reinstall bigft)") from None


def sbatch_quote(value: object) -> str:
    """One #SBATCH argument: double-quoted, with backslash and quote escaped.

    sbatch reads #SBATCH lines itself (no shell): it honours "..." and backslash escapes,
    so this is enough for spaces, quotes, `$()`, backticks and `;`. Line breaks would
    start a new line of shell script; config validation rejects them, and so does this.
    """
    text = str(value)
    if any(c in text for c in "\n\r\0"):
        raise ConfigError(f"sbatch value {text!r} contains a line break")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def slurm_filename(path: Path) -> str:
    """A path for --output: '%' is Slurm's pattern character, so a literal one is '%%'."""
    return str(path).replace("%", "%%")


def time_seconds(limit: str) -> int | None:
    """Seconds in a Slurm time limit ('MM', 'HH:MM:SS', 'D-HH:MM' ...); None if unlimited."""
    if limit.upper() in ("INFINITE", "UNLIMITED"):
        return None
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        parts += [0] * (3 - len(parts))
        return int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    if len(parts) == 1:  # minutes
        return parts[0] * 60
    if len(parts) == 2:  # minutes:seconds
        return parts[0] * 60 + parts[1]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def cpus_per_task(s: SlurmConfig) -> int | None:
    """--cpus-per-task of the one task per node, which runs all of the node's ranks.

    slurm.cpus_per_task if set; else, with GPUs, ranks x slurm.cpus_per_gpu (ranks:
    processes_per_node, default gpus_per_node); else one CPU per rank when
    processes_per_node is set. Without it Slurm would give the task one CPU, and on a
    cluster that binds tasks to their CPUs every rank of the node would share it.
    """
    if s.cpus_per_task is not None:
        return s.cpus_per_task
    if s.gpus_per_node:
        return (s.processes_per_node or s.gpus_per_node) * s.cpus_per_gpu
    return s.processes_per_node


def find_accelerate_config(value: str, config_dir: Path) -> Path | Traversable:
    """The file slurm.accelerate_config names: a path (relative ones from the config's
    directory), else one of the accelerate configs bigft ships, by name ('zero3',
    'zero3.yaml') or by its path in the repository ('launch/accelerate/zero3.yaml')."""
    path = Path(value).expanduser()
    local = path if path.is_absolute() else config_dir / path
    if local.is_file():
        return local
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    candidate = shipped(f"{ACCELERATE_CONFIGS}/{name}")
    known = value in (path.name, f"{ACCELERATE_CONFIGS}/{name}")
    if known and candidate.is_file():
        return candidate
    names = sorted(f.name.removesuffix(".yaml") for f in shipped(ACCELERATE_CONFIGS).iterdir())
    raise ConfigError(
        f"slurm.accelerate_config: {value} not found (relative paths are read from "
        f"{config_dir}); or name one that bigft ships: {', '.join(names)}"
    )


def job_env(s: SlurmConfig, accelerate_config: str | None = None) -> list[tuple[str, str | None]]:
    """Environment exported by the batch script: NCCL knobs, slurm.env, launch settings.

    `accelerate_config` is the job's copy of slurm.accelerate_config. A secret (see
    `secret_env`) has no value here: the script reads it from the job's environment, so
    it is never written to a file.
    """
    env: list[tuple[str, str | None]] = []
    if s.nccl_socket_ifname:
        env += [("NCCL_SOCKET_IFNAME", s.nccl_socket_ifname)]
        env += [("GLOO_SOCKET_IFNAME", s.nccl_socket_ifname)]
    if s.nccl_ib_disable is not None:
        env.append(("NCCL_IB_DISABLE", "1" if s.nccl_ib_disable else "0"))
    if s.nccl_debug:
        env.append(("NCCL_DEBUG", s.nccl_debug))
    if s.nccl_heartbeat_timeout_s:
        env.append(("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", str(s.nccl_heartbeat_timeout_s)))
    exported = dict(s.env)
    checkout = checkout_on_path()
    if checkout is not None:
        # Jobs start Python with PYTHONSAFEPATH=1 (slurm_node.sh): an uninstalled checkout
        # reaches them only through PYTHONPATH, as an install would through site-packages.
        inherited = exported.get("PYTHONPATH", "").split(os.pathsep)
        exported["PYTHONPATH"] = os.pathsep.join([str(checkout), *filter(None, inherited)])
    env += [(k, None if is_secret_name(k) else v) for k, v in sorted(exported.items())]
    env += [
        ("BIGFT_PYTHON", s.python or sys.executable),
        ("BIGFT_LAUNCHER", s.launcher),
        ("BIGFT_RDZV_TIMEOUT", str(s.rdzv_timeout_s)),
        ("BIGFT_REQUEUE", "1" if s.requeue else "0"),
        ("BIGFT_MAX_RESTARTS", str(s.max_restarts)),
    ]
    if s.processes_per_node:
        env.append(("BIGFT_NPROC_PER_NODE", str(s.processes_per_node)))
    if s.master_port:
        env.append(("BIGFT_MASTER_PORT", str(s.master_port)))
    if accelerate_config:
        env.append(("BIGFT_ACCELERATE_CONFIG", accelerate_config))
    return env


def render_script(
    cfg: Config,
    *,
    source: str,
    config: str,
    node_script: str,
    log_path: str,
    accelerate_config: str | None = None,
    array: str | None = None,
    configs_dir: str | None = None,
) -> str:
    """The sbatch script text for `cfg` (pure: reads the template, writes nothing)."""
    import jinja2

    s = cfg.slurm
    if s.time and s.signal_seconds:
        limit = time_seconds(s.time)
        if limit is not None and s.signal_seconds >= limit:
            raise ConfigError(
                f"slurm.signal_seconds ({s.signal_seconds}) must be shorter than slurm.time "
                f"({s.time} = {limit} s)"
            )
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["q"] = lambda value: shlex.quote(str(value))
    env.filters["sbatch"] = sbatch_quote
    values = {
        **s.model_dump(),
        "version": __version__,
        "source": source,
        "job_name": s.job_name or Path(cfg.output_dir).name or "bigft",
        "cpus_per_task": cpus_per_task(s),
        "env": job_env(s, accelerate_config),
        "config": config,
        "node_script": node_script,
        "exit_dir": str(Path(node_script).parent / "exits"),
        "log_path": log_path,
        "array": array,
        "configs_dir": configs_dir,
    }
    return env.from_string(_read_shipped(TEMPLATE)).render(**values)


def load_job_config(
    config: Path, overrides: list[str], flags: dict[str, Any] | None = None
) -> Config:
    """Load a config with absolute paths (the job runs elsewhere) and apply slurm flags."""
    cfg = load_config(config.resolve(), overrides)
    cfg.output_dir = str(Path(cfg.output_dir).resolve())
    for name, value in (flags or {}).items():
        if value is None:
            continue
        try:
            setattr(cfg.slurm, name, value)
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ConfigError(f"--{name.replace('_', '-')}: {msg} (got {value!r})") from None
    return cfg


def launch_files(s: SlurmConfig, config_dir: Path) -> dict[str, str]:
    """What each node runs besides the config: the node script (`node.sh`) and, when
    slurm.accelerate_config is set, that file (`accelerate.yaml`), copied into the job."""
    files = {"node.sh": _read_shipped(NODE_SCRIPT)}
    if s.accelerate_config:
        source = find_accelerate_config(s.accelerate_config, config_dir)
        files["accelerate.yaml"] = source.read_text()
    return files


def write_job_files(job_dir: Path, files: dict[str, str]) -> None:
    """Write the job's files, after everything was rendered and validated."""
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (job_dir / name).parent.mkdir(exist_ok=True)
            (job_dir / name).write_text(text)
    except OSError as exc:
        raise BigftError(f"cannot write the job files in {job_dir} ({exc.strerror})") from None


def prepare_job(cfg: Config, source: Path) -> Path:
    """Render `job.sbatch`, then write it with the frozen config, the node script and the
    accelerate config into `<output_dir>/slurm/`; returns the script's path."""
    job_dir = Path(cfg.output_dir) / "slurm"
    files = launch_files(cfg.slurm, source.resolve().parent)
    files["job.sbatch"] = render_script(
        cfg,
        source=str(source),
        config=str(job_dir / "config.yaml"),
        node_script=str(job_dir / "node.sh"),
        log_path=slurm_filename(job_dir) + "/job-%j.out",
        accelerate_config=str(job_dir / "accelerate.yaml") if "accelerate.yaml" in files else None,
    )
    write_job_files(job_dir, {**files, "config.yaml": dump_config(cfg)})
    return job_dir / "job.sbatch"


def secret_env(s: SlurmConfig) -> dict[str, str]:
    """slurm.env entries that hold credentials (WANDB_API_KEY, HF_TOKEN, ...: a name part
    ending in KEY, TOKEN, SECRET or PASSWORD). They are kept out of the job files; `submit`
    hands them to sbatch in its environment, which sbatch passes on to the job."""
    return {k: v for k, v in s.env.items() if is_secret_name(k)}
