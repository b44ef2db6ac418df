"""Harness for the hostile-input corpus (tests/integration/test_hostile_inputs.py).

A case runs one bigft command line in a fresh sandbox directory and must end the way a
user mistake ends: exit code 2, one line `error: ...` on stderr naming what the user
wrote, no traceback, and not one byte changed under the sandbox. The sandbox is also the
working directory, HOME and the temporary directory of the command, so files written
"somewhere else" by accident are caught too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ASSETS

HOSTILE = ASSETS / "hostile"
BASE_CONFIG = HOSTILE / "base.yaml"
# A command that runs this long is stuck (e.g. it accepted a hostile value and trains on).
CASE_TIMEOUT_S = 150


@dataclass
class Sandbox:
    """One case's directory: `data/` (the hostile data assets), `home/` (HOME), `tmp/`
    (the temporary directory), plus whatever the case's setup puts there."""

    root: Path
    base: Path  # the shared tiny model: read it, never change it
    # Makes (once per module) the finished tiny run that export / eval / report / resume
    # cases copy; only those cases pay for it.
    finished_run: Callable[[], Path] | None = None
    _frozen: list[Path] = field(default_factory=list)

    @property
    def run(self) -> Path:
        assert self.finished_run is not None, "this sandbox has no finished run"
        return self.finished_run()

    def path(self, rel: str) -> Path:
        return self.root / rel

    def expand(self, text: str) -> str:
        """Fill in the placeholders `<sb>` (this sandbox) and `<base>` (the tiny model)."""
        return text.replace("<sb>", str(self.root)).replace("<base>", str(self.base))

    def write(self, rel: str, content: str | bytes) -> Path:
        """Write a file; text gets its placeholders filled in, bytes are written as is."""
        path = self.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(self.expand(content), encoding="utf-8")
        else:
            path.write_bytes(content)
        return path

    def copy_model(self, rel: str = "model") -> Path:
        """A private copy of the tiny model, for cases that break it."""
        return Path(shutil.copytree(self.base, self.path(rel)))

    def copy_run(self, rel: str = "run") -> Path:
        """A private copy of the finished tiny run."""
        return Path(shutil.copytree(self.run, self.path(rel), symlinks=True))

    def symlink_loop(self, rel: str) -> Path:
        """A symlink that points at itself: every lookup through it fails with ELOOP."""
        path = self.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(path.name, path)
        return path

    def freeze(self, rel: str) -> Path:
        """A directory nobody can write into. Root ignores permission bits, so as root
        the directory is made immutable (chattr +i) instead; `thaw` undoes it."""
        path = self.path(rel)
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
        else:
            path.chmod(0o555)
        self._frozen.append(path)
        return path

    def thaw(self) -> None:
        for path in self._frozen:
            if os.geteuid() == 0:
                subprocess.run(["chattr", "-i", str(path)], check=False, capture_output=True)
            else:
                path.chmod(0o755)
        self._frozen.clear()


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """data['a']['b'] = value for 'a.b', creating sections on the way."""
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def config_text(edits: Mapping[str, Any] | None = None, drop: Sequence[str] = ()) -> str:
    """The valid base config (tests/assets/hostile/base.yaml) with dotted keys set or
    removed, as YAML text that still holds the `<sb>` / `<base>` placeholders."""
    data = yaml.safe_load(BASE_CONFIG.read_text())
    for dotted, value in (edits or {}).items():
        set_dotted(data, dotted, value)
    for dotted in drop:
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            node = node[key]
        del node[last]
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------
# What a case leaves behind.

Entry = tuple[Any, ...]


def snapshot(root: Path) -> dict[str, Entry]:
    """Every path under `root`: directories, symlinks (their target) and files (size,
    mtime and content hash). Symlinks are never followed."""
    found: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                found[rel] = ("dir",)
            else:
                st = path.stat()
                digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
                found[rel] = ("file", st.st_size, st.st_mtime_ns, digest)
    return found


def changes(before: dict[str, Entry], after: dict[str, Entry]) -> list[str]:
    """What differs between two snapshots, as short phrases ('wrote out/config.yaml')."""
    found = [f"wrote {p}" for p in sorted(set(after) - set(before))]
    found += [f"removed {p}" for p in sorted(set(before) - set(after))]
    found += [f"changed {p}" for p in sorted(set(before) & set(after)) if before[p] != after[p]]
    return found


# ---------------------------------------------------------------------------------------
# Running a command.


@dataclass
class Outcome:
    """How a command ended, the same way for in-process and real runs."""

    exit_code: int
    stdout: str
    stderr: str
    crash: str | None = None  # an exception the CLI let escape: a real run prints a traceback


class CaseTimeout(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` swallows it."""


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise CaseTimeout(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_in_process(argv: list[str]) -> Outcome:
    """`bigft ARGV` through typer's test runner (fast: libraries stay imported)."""
    from typer.testing import CliRunner

    from bigft.commands import app

    try:
        with time_limit(CASE_TIMEOUT_S):
            result = CliRunner().invoke(app, argv)
    except CaseTimeout as stuck:
        return Outcome(124, "", "", crash=f"timeout ({stuck})")
    crash = None
    escaped = result.exception
    if escaped is not None and not isinstance(escaped, SystemExit):
        first = str(escaped).strip().splitlines()[0] if str(escaped).strip() else ""
        crash = f"{type(escaped).__name__}: {first}"[:200]
    return Outcome(result.exit_code, result.stdout, result.stderr, crash)


def run_real(argv: list[str], env: Mapping[str, str], cwd: Path) -> Outcome:
    """`python -m bigft ARGV` in a child process: the real exit code and stderr."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bigft", *argv],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            cwd=cwd,
            timeout=CASE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return Outcome(124, "", "", crash=f"timeout (still running after {CASE_TIMEOUT_S} s)")
    crash = None
    if "Traceback (most recent call last)" in proc.stderr:
        crash = proc.stderr.strip().splitlines()[-1][:200]
    return Outcome(proc.returncode, proc.stdout, proc.stderr, crash)


def problems(outcome: Outcome, expect: str, written: list[str]) -> list[str]:
    """Everything that is not a clean user-error exit, most telling first."""
    found = []
    if outcome.crash is not None:
        found.append(f"traceback ({outcome.crash})")
    if "Traceback" in outcome.stdout + outcome.stderr and outcome.crash is None:
        found.append("traceback in the output")
    if outcome.exit_code != 2:
        found.append(f"exit {outcome.exit_code}")
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    if len(lines) != 1:
        shown = " | ".join(line.strip() for line in lines[:3])[:300]
        found.append(f"not one line ({len(lines)} lines on stderr: {shown})")
    elif not lines[0].startswith("error: "):
        found.append(f"not an error line ({lines[0][:200]})")
    elif not re.search(expect, lines[0]):
        found.append(f"message does not match /{expect}/ ({lines[0][:300]})")
    if written:
        more = f" (+{len(written) - 3} more)" if len(written) > 3 else ""
        found.append(", ".join(written[:3]) + more)
    return found


Setup = Callable[[Sandbox], Any]


@contextlib.contextmanager
def sandbox_env(sb: Sandbox, cwd: Path) -> Iterator[dict[str, str]]:
    """HOME, the temporary directory and the working directory inside the sandbox, and
    `<sb>/py` importable (where scorer cases put their modules).

    Yields the environment a real child process should get.
    """
    home, tmp, py = sb.path("home"), sb.path("tmp"), sb.path("py")
    home.mkdir(exist_ok=True)
    tmp.mkdir(exist_ok=True)
    saved = {k: os.environ.get(k) for k in ("HOME", "TMPDIR")}
    saved_tempdir, saved_cwd, saved_bytecode = tempfile.tempdir, Path.cwd(), sys.dont_write_bytecode
    saved_modules = set(sys.modules)
    os.environ.update(HOME=str(home), TMPDIR=str(tmp))
    tempfile.tempdir = str(tmp)
    sys.dont_write_bytecode = True  # importing a case's scorer module must not write .pyc
    sys.path.insert(0, str(py))
    os.chdir(cwd)
    try:
        yield {
            "HOME": str(home),
            "TMPDIR": str(tmp),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONPATH": os.pathsep.join([str(py), str(Path(__file__).parents[1])]),
        }
    finally:
        os.chdir(saved_cwd)
        sys.path.remove(str(py))
        for name in set(sys.modules) - saved_modules:
            module_file = getattr(sys.modules[name], "__file__", None) or ""
            if module_file.startswith(str(py)):
                del sys.modules[name]
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        tempfile.tempdir = saved_tempdir
        sys.dont_write_bytecode = saved_bytecode
