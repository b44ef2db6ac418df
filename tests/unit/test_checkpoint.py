"""Checkpoint discovery, the resume compatibility rules and what a checkpoint must hold
of a model with a frozen base (no training)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from bigft.engine import resume as ckpt_resume
from bigft.engine import state_files as ckpt_files
from bigft.engine import storage as ckpt_storage
from bigft.engine.checkpoint import STATE_FILE, latest_checkpoint
from bigft.engine.resume import check_compatible, resolve_resume
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


def test_sharded_adapter_checkpoint_on_other_world_size_needs_its_world_size(
    tmp_path: Path,
) -> None:
    path = fake_checkpoint(tmp_path, 5, "zero3", world=2)
    (path / ckpt_files.BASE_FILE).write_text("{}")  # trained tensors only: no converter helps
    with pytest.raises(BigftError, match=r"resume on 2 process\(es\) \(it holds only the"):
        check_compatible(path, "zero3", 1)


def test_strategy_change_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BigftError, match="written with parallel.strategy=zero2"):
        check_compatible(fake_checkpoint(tmp_path, 5, "zero2"), "fsdp2", 2)


# ---------------------------------------------------------------------------------------
# What a checkpoint must hold of a model with a frozen base (no training here).


class Adapted(torch.nn.Module):
    """A frozen base layer, a trainable adapter whose weight a head shares (tied), and a
    persistent buffer."""

    name_or_path = "base-a"

    def __init__(self, width: int = 2) -> None:
        super().__init__()
        self.base = torch.nn.Linear(2, width).requires_grad_(False)
        self.adapter = torch.nn.Linear(2, 2)
        self.head = torch.nn.Linear(2, 2, bias=False)
        self.head.weight = self.adapter.weight
        self.register_buffer("running", torch.zeros(2))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def test_trainable_state_leaves_frozen_weights_out() -> None:
    model = Adapted()
    state = ckpt_files._trainable_only(model, model.state_dict())
    assert set(state) == {"adapter.weight", "adapter.bias", "head.weight", "running"}


def test_keys_load_strictly_but_ignore_a_saved_frozen_base(tmp_path: Path) -> None:
    model = Adapted()
    # one name of the tied pair is enough (safetensors keeps one); old checkpoints that
    # still hold the frozen base load their trained tensors only
    found = {"adapter.weight", "adapter.bias", "running", "base.weight", "base.bias"}
    assert ckpt_files.check_keys(tmp_path, model, found) == {
        "adapter.weight",
        "adapter.bias",
        "running",
    }

    with pytest.raises(BigftError, match=r"lacks 2 trained tensor\(s\): adapter.bias, running\)"):
        ckpt_files.check_keys(tmp_path, model, {"head.weight"})
    with pytest.raises(BigftError, match=r"holds 1 the model lacks: lora_X\);.*train.resume=never"):
        ckpt_files.check_keys(tmp_path, model, {*found, "lora_X"})
    shapes = {"adapter.weight": [4, 2], "adapter.bias": [2], "running": [2]}
    with pytest.raises(BigftError, match=r"1 differ in shape: adapter.weight \[4, 2\] \(model"):
        ckpt_files.check_keys(tmp_path, model, shapes, shapes)
    assert ckpt_files.plain_key(model, "module.adapter.bias") == "adapter.bias"


def test_resume_onto_another_base_is_refused(tmp_path: Path) -> None:
    def accelerator(model: torch.nn.Module) -> Any:
        return SimpleNamespace(_models=[model], unwrap_model=lambda m: m)

    (tmp_path / ckpt_files.BASE_FILE).write_text(
        json.dumps(ckpt_files._base_fingerprint(accelerator(Adapted())))
    )
    ckpt_files._check_base(accelerator(Adapted()), tmp_path)
    with pytest.raises(BigftError, match="frozen tensors differ in names, shapes or dtypes"):
        ckpt_files._check_base(accelerator(Adapted(width=3)), tmp_path)
    other = Adapted()
    other.name_or_path = "base-b"
    with pytest.raises(
        BigftError, match="trained on the base 'base-a' but this run loads 'base-b'"
    ):
        ckpt_files._check_base(accelerator(other), tmp_path)


def test_disk_check_counts_the_trained_weights_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Adapted()
    monkeypatch.setattr(ckpt_storage, "disk_free", lambda path: 10)
    # adapter 6 fp32 weights (24 B) + Adam 48 B; the frozen base (24 B) is not saved
    with pytest.raises(
        BigftError, match=r"weights 24.0 B \+ optimizer state 48.0 B\) need about 72"
    ):
        ckpt_storage.check_disk_space(tmp_path, model, "adamw", export=False)


# ---------------------------------------------------------------------------------------
# Choosing the checkpoint to resume from: whole ones only, checked without loading.


def whole_checkpoint(root: Path, step: int, name: str | None = None) -> Path:
    """A checkpoint with every file a single-process run writes, small but real."""
    from safetensors.torch import save_file

    path = root / "checkpoints" / (name or f"step-{step:08d}")
    path.mkdir(parents=True)
    save_file({"w": torch.ones(4)}, str(path / "model.safetensors"))
    torch.save({"state": {}, "param_groups": []}, path / "optimizer.bin")
    torch.save({"torch_manual_seed": torch.get_rng_state()}, path / "random_states_0.pkl")
    (path / STATE_FILE).write_text(json.dumps({"step": step, "loader": {}, "strategy": "ddp"}))
    return path


def test_checkpoint_problem_names_the_damaged_file(tmp_path: Path) -> None:
    path = whole_checkpoint(tmp_path, 2)
    assert ckpt_resume.checkpoint_problem(path) is None
    (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:-3])
    assert ckpt_resume.checkpoint_problem(path) == (
        "model.safetensors is truncated (77 bytes; its header declares 80)"
    )
    path = whole_checkpoint(tmp_path, 4)
    (path / STATE_FILE).write_text('{"step": 4, "loa')
    assert str(ckpt_resume.checkpoint_problem(path)).startswith(
        "trainer_state.json is not valid JSON"
    )
    path = whole_checkpoint(tmp_path, 6)
    (path / "optimizer.bin").write_bytes(b"")
    assert ckpt_resume.checkpoint_problem(path) == "optimizer.bin is empty (0 bytes)"
    path = whole_checkpoint(tmp_path, 8)
    (path / "random_states_0.pkl").unlink()  # optional: a warning, not damage
    assert ckpt_resume.checkpoint_problem(path) is None
    assert "rng state missing" in ckpt_resume.rng_warnings(path, 1)[0]
    assert ckpt_resume.rng_warnings(whole_checkpoint(tmp_path, 10), 1) == []
    # a larger world than wrote it (DDP resumes on any size): the new ranks have none
    assert "random_states_1.pkl" in ckpt_resume.rng_warnings(whole_checkpoint(tmp_path, 12), 2)[0]


def test_auto_resume_passes_over_damaged_checkpoints(tmp_path: Path) -> None:
    older = whole_checkpoint(tmp_path, 2)
    newest = whole_checkpoint(tmp_path, 4)
    (newest / "optimizer.bin").unlink()
    point = ckpt_resume.find_resume("auto", tmp_path, 1)
    assert point is not None and point.path == older and point.warnings == []
    assert point.notes == [
        f"skipped the damaged checkpoint {newest}: optimizer.bin is missing; resuming from "
        "step-00000002"
    ]
    (older / "model.safetensors").write_bytes(b"")
    with pytest.raises(BigftError, match=r"no whole checkpoint .*step-00000004: optimizer"):
        ckpt_resume.find_resume("auto", tmp_path, 1)
    with pytest.raises(BigftError, match=r"train.resume: checkpoint '.*step-00000002' is damaged"):
        ckpt_resume.find_resume(str(older), tmp_path, 1)
    assert ckpt_resume.find_resume("auto", tmp_path / "fresh", 1) is None


def test_a_checkpoint_being_replaced_counts_under_its_final_name(tmp_path: Path) -> None:
    """step-N.old (a complete checkpoint whose replacement never landed) is what
    clean_partial puts back: resume picks it without moving anything first."""
    whole_checkpoint(tmp_path, 2)
    old = whole_checkpoint(tmp_path, 4, name="step-00000004.old")
    point = ckpt_resume.find_resume("auto", tmp_path, 1)
    assert point is not None and point.path.name == "step-00000004"
    assert point.location == old and old.is_dir() and not point.path.exists()


def test_engine_formats_are_checked_whole(tmp_path: Path) -> None:
    """FSDP2's DCP folders (each shard holds the bytes .metadata declares) and DeepSpeed's
    pickles (each has its zip directory), written here on one process."""
    import torch.distributed.checkpoint as dcp

    fsdp = tmp_path / "fsdp2"
    for sub in ("pytorch_model_fsdp_0", "optimizer_0"):
        writer = dcp.FileSystemWriter(str(fsdp / sub))
        dcp.save({"model": {"w": torch.ones(256)}}, storage_writer=writer)
    (fsdp / STATE_FILE).write_text(json.dumps({"step": 2, "loader": {}, "strategy": "fsdp2"}))
    assert ckpt_resume.checkpoint_problem(fsdp) is None
    shard = next((fsdp / "pytorch_model_fsdp_0").glob("*.distcp"))
    with shard.open("r+b") as fh:
        fh.truncate(100)
    assert re.fullmatch(
        rf"pytorch_model_fsdp_0/{shard.name} is truncated \(100 bytes; "
        r"pytorch_model_fsdp_0/\.metadata declares \d+\)",
        str(ckpt_resume.checkpoint_problem(fsdp)),
    )

    zero = tmp_path / "zero3"
    (zero / "pytorch_model").mkdir(parents=True)
    (zero / STATE_FILE).write_text(json.dumps({"step": 2, "loader": {}, "strategy": "zero3"}))
    assert ckpt_resume.checkpoint_problem(zero) == "pytorch_model/*model_states.pt is missing"
    model_states = zero / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    optim_states = zero / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    for file in (model_states, optim_states):
        torch.save({"module": {"w": torch.ones(256)}}, file)
    assert ckpt_resume.checkpoint_problem(zero) is None
    optim_states.write_bytes(optim_states.read_bytes()[:200])
    assert ckpt_resume.checkpoint_problem(zero) == (
        f"pytorch_model/{optim_states.name} is truncated or corrupt (its zip directory is "
        "unreadable)"
    )
