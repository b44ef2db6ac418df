"""Reading and writing configs: YAML with line numbers, `key=value` overrides, and
error messages that name the file, line or override to fix.

A key written twice, a file that is not UTF-8 text, an override of a section by a plain
value: each is one line naming where it is. Relative data and model paths resolve
against the config file's directory, `~` against the home directory. `dump_config`
writes the resolved config with secrets redacted.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

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
    _resolve_paths(config, path.parent)
    return config


def _expand(value: str) -> str:
    """`~` (or `~user`) at the start of a path is that home directory: YAML and the
    command line's key=value leave it to the program. Hub ids never start with it."""
    return value if value.startswith("hub:") else os.path.expanduser(value)


def _resolve(value: str, base: Path) -> str:
    value = _expand(value)
    if value.startswith("hub:") or Path(value).is_absolute():
        return value
    candidate = base / value
    return str(candidate) if candidate.exists() or not Path(value).exists() else value


def _resolve_paths(config: Config, base: Path) -> None:
    """Data paths, and model directories that exist there, are relative to the config
    file, like includes; output_dir and the rest to the current directory. `~` is
    expanded in every path."""
    data = config.data
    data.train = [
        _resolve(e, base)
        if isinstance(e, str)
        else e.model_copy(update={"path": _resolve(e.path, base)})
        for e in ([data.train] if isinstance(data.train, str) else data.train)
    ]
    if data.validation:
        data.validation = _resolve(data.validation, base)
    if data.test:
        data.test = _resolve(data.test, base)
    models: tuple[tuple[Section, str], ...] = (
        (config.model, "name_or_path"),
        (config.model, "tokenizer"),
        (config.distill, "teacher"),
    )
    for section, attr in models:
        value = getattr(section, attr)
        if not value:
            continue
        value = _expand(value)
        if not Path(value).is_absolute() and (base / value).exists():
            value = str(base / value)
        setattr(section, attr, value)
    config.output_dir = _expand(config.output_dir)
    if config.train.resume not in ("auto", "never"):
        config.train.resume = _expand(config.train.resume)
    others: tuple[tuple[Section, str], ...] = (
        (config.parallel, "deepspeed_config"),
        (config.slurm, "accelerate_config"),
        (config.slurm, "setup_script"),
        (config.slurm, "python"),
        (config.data, "prepared_dir"),
    )
    for section, attr in others:
        if getattr(section, attr):
            setattr(section, attr, _expand(getattr(section, attr)))


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
