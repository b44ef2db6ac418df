"""Files a run writes get the mode the umask gives any new file, so a cluster group that
can read the run can read its weights (safetensors writes them 0600)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers import alpaca_rows, write_config, write_jsonl

UMASK = 0o002  # group-writable, common on shared clusters: files 0664, directories 0775


@pytest.fixture
def umask() -> Iterator[int]:
    old = os.umask(UMASK)
    try:
        yield UMASK
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    """Permission bits of every file and directory under `root` (symlinks left out)."""
    return {
        str(path.relative_to(root)): stat.S_IMODE(path.lstat().st_mode)
        for path in [root, *root.rglob("*")]
        if not path.is_symlink()
    }


def _wrong(root: Path, mask: int) -> dict[str, str]:
    expected = {True: 0o777 & ~mask, False: 0o666 & ~mask}
    return {
        name: oct(mode)
        for name, mode in _modes(root).items()
        if mode != expected[(root / name).is_dir()]
    }


def test_safetensors_writes_private_files_and_bigft_shares_them(tmp_path, umask) -> None:
    """The upstream behaviour the run test guards against, and the helper that fixes it."""
    from safetensors.torch import save_file

    from bigft.engine.storage import share_like_other_files

    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    if _wrong(folder, umask) != {"model.safetensors": "0o600"}:
        pytest.skip("safetensors no longer writes 0600 files here")
    share_like_other_files(folder)
    assert _wrong(folder, umask) == {}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_every_file_of_a_run_and_its_export_has_the_umask_mode(
    tiny_base, tmp_path, umask, method: str
) -> None:
    """Checkpoints (a periodic one and the best), the final export, the lock while the
    run holds it, metrics and trackers, and `bigft export` (merged for LoRA)."""
    if method == "lora":
        pytest.importorskip("peft")
    from bigft.config_io import load_config
    from bigft.loop.setup import setup
    from bigft.loop.train import train
    from bigft.model.export import export_run
    from bigft.rundir import LOCK

    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(48))
    cfg = load_config(
        write_config(
            tmp_path / "cfg.yaml",
            tiny_base,
            data,
            method={"name": method},
            train={"steps": 4},
            eval={"every_steps": 2},
            checkpoint={"every_steps": 2, "keep_best": True},
            logging={"progress_bar": False, "trackers": ["tensorboard"]},
        )
    )
    out = Path(cfg.output_dir)
    run = setup(cfg)
    lock = stat.S_IMODE((out / LOCK).stat().st_mode)
    assert lock == 0o666 & ~umask, oct(lock)
    train(run)
    exported = export_run(out, tmp_path / "exported", merge=method == "lora")

    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert (out / "final" / weights).is_file()
    assert (exported / "model.safetensors").is_file()
    assert len(list((out / "checkpoints").glob("step-*/model.safetensors"))) == 2
    assert _wrong(out, umask) == {}
    assert _wrong(exported, umask) == {}
