"""Checkpoint discovery and the resume compatibility rules (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigft.checkpoint import STATE_FILE, check_compatible, latest_checkpoint, resolve_resume
from bigft.errors import BigftError


def fake_checkpoint(
    root: Path, step: int, strategy: str = "ddp", world: int = 2, done: bool = True
) -> Path:
    path = root / "checkpoints" / f"step-{step:08d}"
    path.mkdir(parents=True)
    if done:
        (path / STATE_FILE).write_text(
            json.dumps({"step": step, "strategy": strategy, "world_size": world})
        )
    return path


def test_latest_complete_checkpoint_wins(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 10)
    newest = fake_checkpoint(tmp_path, 20)
    fake_checkpoint(tmp_path, 30, done=False)  # killed mid-write: no state file
    (tmp_path / "checkpoints" / "step-00000040.tmp").mkdir()
    assert latest_checkpoint(tmp_path) == newest
    assert resolve_resume("auto", tmp_path) == newest
    assert resolve_resume("never", tmp_path) is None
    with pytest.raises(BigftError, match="not a complete bigft checkpoint"):
        resolve_resume(str(tmp_path / "checkpoints" / "step-00000030"), tmp_path)


def test_ddp_resumes_on_any_world_size(tmp_path: Path) -> None:
    check_compatible(fake_checkpoint(tmp_path, 5, "ddp", world=2), "ddp", 1)


@pytest.mark.parametrize(
    ("strategy", "hint"), [("zero3", "universal checkpoint"), ("fsdp2", "export")]
)
def test_sharded_checkpoint_on_other_world_size_is_refused(
    tmp_path: Path, strategy: str, hint: str
) -> None:
    path = fake_checkpoint(tmp_path, 5, strategy, world=2)
    check_compatible(path, strategy, 2)
    with pytest.raises(BigftError, match=f"shards of 2 process.*this run has 1.*{hint}"):
        check_compatible(path, strategy, 1)


def test_strategy_change_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BigftError, match="written with parallel.strategy=zero2"):
        check_compatible(fake_checkpoint(tmp_path, 5, "zero2"), "fsdp2", 2)
