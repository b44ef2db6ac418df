"""The YAML under a config and the `key=value` overrides on top of it, each with where it came
from: keys with their line numbers, a key written twice refused, a file that is not UTF-8
text named, an override of a section by a plain value refused.
"""

from __future__ import annotations

import codecs
import stat
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from bigft.config import Config
from bigft.errors import ConfigError


class DuplicateKeyError(yaml.YAMLError):
    """A key written twice in one YAML mapping."""

    def __init__(self, path: tuple[str, ...], first: int, line: int, section: bool) -> None:
        self.path, self.first, self.line, self.section = path, first, line, section
        super().__init__(self.describe())

    def describe(self) -> str:
        """'train: duplicate key (first at line 3); merge the two'."""
        fix = "merge the two" if self.section else "keep one"
        return f"{'.'.join(self.path)}: duplicate key (first at line {self.first}); {fix}"


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping.

    Plain YAML keeps the last of them without a word, so a second `train:` block would
    replace the first. `mapping_paths` (id of a mapping node -> its key path), filled from
    the composed document before construction, lets the error name the key.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.mapping_paths: dict[int, tuple[str, ...]] = {}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` is meant to be overridden by the keys beside it
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            line = key_node.start_mark.line + 1
            if first is not None:
                path = (*self.mapping_paths.get(id(node), ()), str(key))
                raise DuplicateKeyError(path, first, line, isinstance(value_node, yaml.MappingNode))
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _key_lines(
    node: yaml.Node, mapping_paths: dict[int, tuple[str, ...]] | None = None
) -> dict[tuple[str, ...], int]:
    """Map each dotted key path in a composed YAML document to its 1-based line (and, in
    `mapping_paths`, each mapping node to its key path).

    A node reached again through an alias is not walked again: aliases of aliases grow
    exponentially, and an anchor can contain itself.
    """
    lines: dict[tuple[str, ...], int] = {}
    paths = {} if mapping_paths is None else mapping_paths
    seen: set[int] = set()

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            paths[id(node)] = prefix
            for key_node, value_node in node.value:
                path = (*prefix, str(key_node.value))
                lines.setdefault(path, key_node.start_mark.line + 1)
                walk(value_node, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                path = (*prefix, str(i))
                lines[path] = item.start_mark.line + 1
                walk(item, path)

    walk(node, ())
    return lines


def _load_yaml(text: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    """(data, key path -> line) of one YAML document; raises yaml.YAMLError (including
    DuplicateKeyError) and RecursionError (absurdly deep nesting)."""
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        lines = _key_lines(node, loader.mapping_paths)
        return loader.construct_document(node), lines
    finally:
        loader.dispose()


# Wider Unicode encodings, recognised by their byte-order mark (UTF-32 LE's begins with
# UTF-16 LE's, so it is tried first).
_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def _read_text(path: Path) -> str:
    """The config file's text: UTF-8, with or without a byte-order mark."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
    if stat.S_ISDIR(mode):
        raise ConfigError(f"{path}: is a directory; give the YAML config file itself")
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{path}: not a regular file; give a YAML config file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
    for bom, encoding in _WIDE_BOMS:
        if raw.startswith(bom):
            raise ConfigError(f"{path}: the file is {encoding} text; save it as UTF-8")
    if b"\0" in raw:
        line = raw.count(b"\n", 0, raw.index(b"\0")) + 1
        raise ConfigError(
            f"{path}:{line}: invalid YAML: a NUL byte (a binary file, or UTF-16/32 text?); "
            "save the config as UTF-8 text"
        )
    try:
        return raw.decode("utf-8-sig")  # a UTF-8 byte-order mark is dropped
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"
        ) from None


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    text = _read_text(path)
    try:
        data, lines = _load_yaml(text)
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}:{exc.line}: {exc.describe()}") from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(
            f"{path}:{line}: character U+{exc.character:04X} is not allowed in YAML (a "
            "control character: is this a binary file?)"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {' '.join(problem.split())}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    if data is None:
        raise ConfigError(f"{path}: the config file is empty")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections (model:, data:, ...)"
        )
    return data, lines


def parse_override(item: str) -> tuple[list[str], Any]:
    """`optim.lr=1e-4` -> (['optim', 'lr'], 1e-4). Values are read as YAML scalars, lists
    or mappings (`train={steps: 5, seq_len: 512}`)."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}': expected key=value, e.g. optim.lr=1e-4")
    if any(c in item for c in "\n\r\0"):
        # YAML would fold a line break into a space: the value would not be what was typed.
        raise ConfigError(
            f"command-line override {key}: the value {raw!r} holds a line break or NUL; "
            "write it on one line"
        )
    try:
        value = _load_yaml(raw)[0] if raw.strip() else ""
    except DuplicateKeyError as exc:
        twice = ".".join([key, *exc.path])
        raise ConfigError(f"override '{item}': {twice} is given twice") from None
    except (yaml.YAMLError, RecursionError):
        value = raw  # not YAML: the text itself (a path, a name)
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        value = raw  # `json:` or `a: b` is text; a mapping is written {key: value}
    return key.split("."), value


def _check_override_keys(item: str, keys: list[str], value: Any) -> None:
    """Refuse a scalar over a section (`train=5`) and a key below a scalar field
    (`train.steps.x=1`). Unknown keys are left to validation, which names the nearest."""
    model: type[BaseModel] = Config
    for depth, key in enumerate(keys):
        field = model.model_fields.get(key)
        if field is None:
            return
        annotation = field.annotation
        path = ".".join(keys[: depth + 1])
        members = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else ()
        optional = type(None) in members
        section = next(
            (m for m in (annotation, *members) if isinstance(m, type) and issubclass(m, BaseModel)),
            None,
        )
        if depth == len(keys) - 1:
            if (
                section is not None
                and not isinstance(value, dict)
                and not (optional and value is None)
            ):
                raise ConfigError(
                    f"command-line override {path}: a section, not a value (got "
                    f"{short_repr(value)}); set its keys ({path}.KEY=VALUE) or merge a mapping "
                    f"into it ({path}={{KEY: VALUE}})"
                )
        elif section is not None:
            model = section
        elif get_origin(annotation) is dict:
            return  # a free-form mapping (slurm.env): any key
        else:
            raise ConfigError(f"override '{item}': {path} is not a section")


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` deep-merged over `base`, as new dicts (YAML aliases may share `base`)."""
    out = dict(base)
    for key, value in update.items():
        old = out.get(key)
        out[key] = (
            _merged(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
        )
    return out


def _leaf_paths(value: Any, prefix: tuple[str, ...]) -> set[tuple[str, ...]]:
    """Key paths of the values a mapping merged into the config sets; the mappings
    themselves are not set by it, so keys the file gives beside them are still blamed
    on the file."""
    if not isinstance(value, dict) or not value:
        return {prefix}
    paths: set[tuple[str, ...]] = set()
    for key, item in value.items():
        paths |= _leaf_paths(item, (*prefix, str(key)))
    return paths


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> set[tuple[str, ...]]:
    """Set dotted keys in place; returns the key paths that came from the command line.

    A mapping value merges into the mapping it overrides (`train={steps: 5}` keeps the
    other train keys); a section cannot be replaced by a scalar.
    """
    touched: set[tuple[str, ...]] = set()
    for item in overrides:
        keys, value = parse_override(item)
        _check_override_keys(item, keys, value)
        node = data
        for depth, part in enumerate(keys[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise ConfigError(f"override '{item}': {where} is not a section")
            node = child
        old = node.get(keys[-1])
        if isinstance(old, dict) and isinstance(value, dict):
            touched |= _leaf_paths(value, tuple(keys))
            value = _merged(old, value)
        else:
            touched |= {tuple(keys)}  # and everything below it
        node[keys[-1]] = value
    return touched


def user_overrides(overrides: list[str] | None) -> list[str]:
    """The command line's overrides, with a key given twice refused: one of the two values
    would be dropped without a word. (`load_config` itself lets a later override win:
    callers append theirs to the user's.)"""
    seen: dict[str, str] = {}
    for item in overrides or []:
        key = ".".join(parse_override(item)[0])
        if key in seen:
            raise ConfigError(
                f"command-line override {key} is given twice ('{seen[key]}' and '{item}'); keep one"
            )
        seen[key] = item
    return list(overrides or [])


def short_repr(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}..." if len(text) > 80 else text
