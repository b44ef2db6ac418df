"""Reading and writing configs: YAML with line numbers, `key=value` overrides, and
error messages that name the file, line or override to fix.

A key written twice, a file that is not UTF-8 text, an override of a section by a plain
value: each is one line naming where it is. Relative paths written in the file resolve
against its folder, those given as overrides against the working directory (`PATH_RULE`);
`~` is the home directory. `dump_config` writes the resolved config with secrets
redacted; `show_config` adds what `bigft config show` explains.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from bigft.config import Config, Section
from bigft.config_yaml import apply_overrides, read_yaml, short_repr
from bigft.errors import ConfigError


def _fields_at(loc: tuple[str | int, ...]) -> list[str]:
    """Valid field names of the section at `loc` (for 'did you mean')."""
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return list(model.model_fields)


def _key_path(loc: tuple[str | int, ...]) -> tuple[tuple[str, ...], int]:
    """(key path, length of the field's own path) of a validation error.

    Inside a field that may hold values of several types (`str | list[str]`), pydantic
    adds the member it tried (`list[str]`, `function-after[...]`) to the location; that
    part names no key and is dropped. Errors of one such field share its path length.
    """
    path: list[str] = []
    field_len = len(loc)
    model: type[BaseModel] | None = Config
    union_member_next = False
    for part in loc:
        if union_member_next:
            union_member_next = False
            if isinstance(part, str):
                field_len = len(path)
                continue
        path.append(str(part))
        field = model.model_fields.get(str(part)) if model is not None else None
        annotation = getattr(field, "annotation", None)
        model = None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif get_origin(annotation) in (Union, types.UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            union_member_next = len(members) > 1
    return tuple(path), min(field_len, len(path))


def _where(
    loc: tuple[str, ...],
    source: str,
    lines: dict[tuple[str, ...], int],
    overridden: set[tuple[str, ...]],
) -> str:
    """'cfg.yaml:12: train.steps', or 'command-line override train.steps'."""
    key = ".".join(loc) or "(top level)"
    if any(loc[:n] in overridden for n in range(1, len(loc) + 1)):
        return f"command-line override {key}"
    if loc not in lines and any(path[: len(loc)] == loc for path in overridden):
        return f"command-line override {key}"  # a section only the command line wrote
    line = None
    for n in range(len(loc), 0, -1):  # nearest enclosing key that has a line
        line = lines.get(loc[:n])
        if line is not None:
            break
    return f"{source}:{line}: {key}" if line else f"{source}: {key}"


def _shown(value: Any) -> str:
    if isinstance(value, dict | list) or value is None:
        return ""
    return f" (got {short_repr(value)})"


def _format_error(
    err: dict[str, Any],
    source: str,
    lines: dict[tuple[str, ...], int],
    overridden: set[tuple[str, ...]],
) -> str:
    loc = _key_path(tuple(err["loc"]))[0]
    msg = err["msg"].removeprefix("Value error, ")
    # A check across keys runs on their section but names the key to blame first
    # ('schedule.warmup_steps: ...'); blame that key, at its line.
    named = re.match(r"([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)+): (.*)", msg, re.DOTALL)
    if named and tuple(named[1].split("."))[: len(loc)] == loc:
        loc, msg = tuple(named[1].split(".")), named[2]
    where = _where(loc, source, lines, overridden)
    if err["type"] == "extra_forbidden":
        valid = _fields_at(err["loc"][:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
        return f"{where}: unknown key{hint}"
    if err["type"] == "missing":
        return f"{where}: required key is missing"
    return f"{where}: {msg}{_shown(err.get('input'))}"


# Error types that only say "this member of a union does not fit".
_MISMATCH = re.compile(r"_type$|_parsing$|^literal_error$")


def _first_problem(errors: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """(the error to show, how many fields have errors).

    A value that fits no member of a union field gets one error per member ('not a valid
    string', and the list's own complaint); they are one problem. The one shown is the
    most specific: not a mere type mismatch, and deepest (an item of the list).
    """
    fields: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for err in errors:
        path, field_len = _key_path(tuple(err["loc"]))
        fields.setdefault(path[:field_len], []).append(err)
    first = next(iter(fields.values()))
    best = min(
        first, key=lambda e: (bool(_MISMATCH.search(e["type"])), -len(_key_path(e["loc"])[0]))
    )
    return best, len(fields)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply `key=value` overrides, validate, resolve paths."""
    path = Path(path).expanduser()
    data, lines = read_yaml(path)
    overridden = apply_overrides(data, overrides or [])
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        error, problems = _first_problem([dict(e) for e in exc.errors()])
        first = _format_error(error, str(path), lines, overridden)
        more = f" (and {problems - 1} more problem(s))" if problems > 1 else ""
        raise ConfigError(first + more) from None
    _resolve_paths(config, _PathRule(path, lines, overridden))
    return config


def _expand(value: str) -> str:
    """`~` (or `~user`) at the start of a path is that home directory: YAML and the
    command line's key=value leave it to the program. Hub ids never start with it."""
    return value if value.startswith("hub:") else os.path.expanduser(value)


PATH_RULE = (
    "relative paths written in a config file resolve against the file's folder; "
    "relative paths given as key=value on the command line, against the working directory"
)


# `name` or `org/name`: what the hub accepts as a model id. `./x`, `../x` and deeper paths
# are never hub ids.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def looks_like_hub_id(value: str) -> bool:
    """Whether a model name could be a hub id (`gpt2`, `meta-llama/Llama-3.1-8B`)."""
    return bool(_HUB_ID.fullmatch(value)) and ".." not in value


# input: must exist (data, a checkpoint); output: made by the run; model: a directory or,
# when it names none, a hub id; name: a file, or a name bigft ships (accelerate configs);
# command: a program, looked up on PATH unless it holds a '/'.
PathKind = Literal["input", "output", "model", "name", "command"]


@dataclass(frozen=True)
class _PathRule:
    """Where one config's relative paths point: the config file's folder for values
    written in the file, the working directory for command-line overrides."""

    source: Path
    lines: dict[tuple[str, ...], int]
    overridden: set[tuple[str, ...]]

    def from_command_line(self, key: tuple[str, ...]) -> bool:
        return any(key[:n] in self.overridden for n in range(1, len(key) + 1))

    def resolve(self, key: tuple[str, ...], value: str, kind: PathKind = "input") -> str:
        """`value` as an absolute path, or unchanged when it is not a path (a hub id, a
        shipped name, a program on PATH)."""
        value = _expand(value)
        if value.startswith("hub:") or "://" in value or Path(value).is_absolute():
            return value  # a hub dataset, a URL, or a path already absolute
        if kind == "command" and "/" not in value:
            return value
        on_cli = self.from_command_line(key)
        base = Path.cwd() if on_cli else self.source.absolute().parent
        here = Path(os.path.abspath(base / value))
        if here.exists() or kind == "output":
            return str(here)
        if kind == "name":
            return value
        cwd_copy = Path(os.path.abspath(value))
        if not on_cli and kind != "command" and cwd_copy.exists() and cwd_copy != here:
            where = _where(key, str(self.source), self.lines, self.overridden)
            raise ConfigError(
                f"{where}: {here} does not exist ('{value}' is read from the config file's "
                f"folder, not from the working directory, where {cwd_copy} exists); write "
                f"the path relative to {base} or absolute, or pass it on the command "
                f"line ({'.'.join(key)}={value})"
            )
        if kind == "model" and looks_like_hub_id(value):
            return value
        return str(here)


def _resolve_paths(config: Config, rule: _PathRule) -> None:
    """Every path of the config as an absolute path, by `PATH_RULE`; `~` is the home
    directory in every path."""
    data = config.data
    train = [data.train] if isinstance(data.train, str) else data.train
    data.train = [
        rule.resolve(("data", "train"), e)
        if isinstance(e, str)
        else e.model_copy(update={"path": rule.resolve(("data", "train"), e.path)})
        for e in train
    ]
    paths: tuple[tuple[str, str, PathKind], ...] = (
        ("data", "validation", "input"),
        ("data", "test", "input"),
        ("data", "prepared_dir", "output"),
        ("model", "name_or_path", "model"),
        ("model", "tokenizer", "model"),
        ("distill", "teacher", "model"),
        ("parallel", "deepspeed_config", "input"),
        ("slurm", "accelerate_config", "name"),
        ("slurm", "setup_script", "input"),
        ("slurm", "python", "command"),
    )
    for name, attr, kind in paths:
        section: Section = getattr(config, name)
        value = getattr(section, attr)
        if value:
            setattr(section, attr, rule.resolve((name, attr), value, kind))
    text = data.augment.text
    if text is not None:
        key = ("data", "augment", "text")
        if text.synonyms and text.synonyms != "wordnet":
            text.synonyms = rule.resolve((*key, "synonyms"), text.synonyms)
        if text.back_translation is not None:
            bt, at = text.back_translation, (*key, "back_translation")
            bt.forward = rule.resolve((*at, "forward"), bt.forward)
            bt.backward = rule.resolve((*at, "backward"), bt.backward)
    config.output_dir = rule.resolve(("output_dir",), config.output_dir, "output")
    if config.train.resume not in ("auto", "never"):
        config.train.resume = rule.resolve(("train", "resume"), config.train.resume)


# An environment variable whose name has a part ending in KEY, TOKEN, SECRET or PASSWORD
# (WANDB_API_KEY, HF_TOKEN, MLFLOW_TRACKING_PASSWORD) holds a secret. Whole name parts, so
# TOKENIZERS_PARALLELISM is not one.
_SECRET_NAME = re.compile(r"(^|_)[A-Z0-9]*(KEY|TOKEN|SECRET|PASSWORD|PASSWD)S?(_|$)", re.I)


REDACTED = "***"


def is_secret_name(name: str) -> bool:
    """Whether an environment variable of this name holds a credential."""
    return bool(_SECRET_NAME.search(name))


def redacted_config(config: Config) -> dict[str, Any]:
    """The config as plain data, safe to write or send to a tracker.

    slurm.env values of secret-named variables become '***', and so does any text that
    contains the value of a secret variable of this process's environment (a token pasted
    into a path or URL).
    """
    data = config.model_dump(mode="json")
    for name in data["slurm"]["env"]:
        if is_secret_name(name):
            data["slurm"]["env"][name] = REDACTED
    # Short values ('1', 'true') would redact unrelated text; real credentials are long.
    secrets = [v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= 8]
    return _without(data, secrets) if secrets else data


def _without(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _without(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_without(v, secrets) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
    return value


def dump_config(config: Config) -> str:
    """The fully resolved config as YAML (what is written to the run directory), with
    secrets redacted (see `redacted_config`)."""
    return yaml.safe_dump(redacted_config(config), sort_keys=False, allow_unicode=True)


# What parallel.strategy means when a config leaves it unset (see
# `bigft.engine.accelerator.adopt_launcher_strategy`).
LAUNCHER_STRATEGY = (
    "unset: the launcher decides; accelerate launch with a DeepSpeed or FSDP config runs "
    "that engine (zero1-3, fsdp2), torchrun / bigft launch / accelerate multi-GPU run ddp "
    "over their processes, plain `bigft train` runs one process (no data parallelism)"
)


def show_config(config: Config, source: Path) -> str:
    """`bigft config show`: the resolved config as YAML under comment lines stating how
    its relative paths were resolved; a parallel.strategy the config leaves unset says
    what decides it instead of showing the default as a choice."""
    header = [
        f"# {PATH_RULE}.",
        f"# config file's folder: {Path(source).expanduser().absolute().parent}",
        f"# working directory: {Path.cwd()}",
    ]
    lines = dump_config(config).splitlines()
    if "strategy" not in config.parallel.model_fields_set:
        section = ""
        for i, line in enumerate(lines):
            if not line.startswith(" "):
                section = line.partition(":")[0]
            elif section == "parallel" and line.startswith("  strategy: "):
                lines[i] = f"{line}  # {LAUNCHER_STRATEGY}"
                break
    return "\n".join([*header, *lines]) + "\n"
