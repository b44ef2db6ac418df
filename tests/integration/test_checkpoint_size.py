"""Checkpoints of a run with a frozen base (lora, dora, qlora, freeze) hold the trained
tensors and the optimizer state only, load strictly, and resume bitwise.

The tiny base has 86,848 weights; a rank-4 adapter has 8,192, so a checkpoint that
still carried the base would be ~4x the size of one that holds the adapter alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from bigft.commands import app
from bigft.config_io import load_config
from bigft.engine import checkpoint as ckpt
from bigft.engine import state_files as ckpt_files
from bigft.loop.setup import setup
from bigft.loop.train import train
from tests.helpers import alpaca_rows, write_config, write_jsonl

pytest.importorskip("peft")

METHODS = {
    "lora": ["method.name=lora", "method.lora.r=4"],
    "dora": ["method.name=dora", "method.lora.r=4"],
    "qlora": ["method.name=qlora", "method.lora.r=4", "method.quant.compute_dtype=float32"],
    "freeze": [
        "method.name=freeze",
        "method.freeze_embeddings=true",
        "method.freeze_first_layers=1",
    ],
}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("ckpt-data") / "train.jsonl", alpaca_rows(48))


def config_file(tmp_path: Path, tiny_base: Path, data_file: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_config(tmp_path / "cfg.yaml", tiny_base, data_file, output_dir=str(tmp_path))


def config(tmp_path: Path, tiny_base: Path, data_file: Path, *overrides: str) -> Any:
    path = config_file(tmp_path, tiny_base, data_file)
    return load_config(path, [f"output_dir={tmp_path / 'out'}", *overrides])


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def trainable_weights(run: Any) -> dict[str, torch.Tensor]:
    model = run.accelerator.unwrap_model(run.model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", list(METHODS))
def test_checkpoint_leaves_the_frozen_base_out(
    method: str, tiny_base: Path, data_file: Path, tmp_path: Path
) -> None:
    steps = ("train.steps=2", "checkpoint.every_steps=2", "checkpoint.export=false")
    run = setup(config(tmp_path, tiny_base, data_file, *METHODS[method], *steps))
    model = run.accelerator.unwrap_model(run.model)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(not p.requires_grad for p in model.parameters())
    train(run)
    saved = ckpt.checkpoint_root(tmp_path / "out") / "step-00000002"
    weights = sum(p.numel() * p.element_size() for p in trained.values())
    adam = sum(2 * p.numel() * 4 for p in trained.values())  # two fp32 moments
    size = disk_bytes(saved)
    print(f"{method}: checkpoint {size} bytes; trained weights {weights} + Adam {adam}")
    assert size < 2 * (weights + adam)
    # exactly the trained tensors: no frozen weight, no 4-bit quantization constant
    assert set(load_file(saved / "model.safetensors")) == set(trained)
    base = json.loads((saved / ckpt_files.BASE_FILE).read_text())
    assert base["name_or_path"] == str(tiny_base.resolve())


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_resume_reproduces_uninterrupted_run(
    method: str, tiny_base: Path, data_file: Path, tmp_path: Path
) -> None:
    def final_weights(out: Path, interrupt: bool) -> dict[str, torch.Tensor]:
        cfg = config(
            out,
            tiny_base,
            data_file,
            *METHODS[method],
            "optim.lr=1e-2",
            "train.steps=6",
            "checkpoint.every_steps=100",
            "checkpoint.export=false",
        )
        if interrupt:
            assert train(setup(cfg), stop_after=3)["stopped"]
        run = setup(cfg)
        assert run.state.step == (3 if interrupt else 0)
        train(run)
        return trainable_weights(run)

    straight = final_weights(tmp_path / "a", interrupt=False)
    resumed = final_weights(tmp_path / "b", interrupt=True)
    assert straight.keys() == resumed.keys() and straight
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def resume_error(cfg: Path, *overrides: str) -> str:
    """`bigft train` resuming: must fail with exit code 2 and a one-line error, no
    traceback."""
    result = CliRunner().invoke(app, ["train", str(cfg), *overrides])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.output
    assert result.exit_code == 2 and len(errors) == 1, result.output
    return errors[0]


def test_checkpoint_that_does_not_fit_is_refused(
    tiny_base: Path, data_file: Path, tmp_path: Path
) -> None:
    cfg = config_file(tmp_path, tiny_base, data_file)
    args = [*METHODS["lora"], f"output_dir={tmp_path / 'out'}", "train.steps=4"]
    run = setup(load_config(cfg, [*args, "checkpoint.every_steps=2"]))
    train(run, stop_after=2)
    saved = ckpt.checkpoint_root(tmp_path / "out") / "step-00000002"
    file = saved / "model.safetensors"
    good = load_file(file)
    dropped = sorted(good)[0]

    save_file({k: v for k, v in good.items() if k != dropped}, file, metadata={"format": "pt"})
    line = resume_error(cfg, *args)
    assert f"checkpoint {saved} does not fit this model" in line
    assert f"lacks 1 trained tensor(s): {dropped}" in line and "train.resume=never" in line

    save_file({**good, "not.in.the.model": torch.zeros(1)}, file, metadata={"format": "pt"})
    assert "holds 1 the model lacks: not.in.the.model" in resume_error(cfg, *args)

    save_file(good, file, metadata={"format": "pt"})
    rank8 = [a.replace("method.lora.r=4", "method.lora.r=8") for a in args]
    assert "differ in shape" in resume_error(cfg, *rank8)

    # The adapters only fit the base they were trained on.
    other = tmp_path / "other-base"
    shutil.copytree(tiny_base, other)
    line = resume_error(cfg, *args, f"model.name_or_path={other}")
    assert f"was trained on the base '{tiny_base.resolve()}'" in line

    # Intact, it resumes.
    run = setup(load_config(cfg, args))
    assert run.state.step == 2


def launch(cfg: Path, *overrides: str) -> str:
    """`bigft launch` on 2 processes; returns what it printed (newlines removed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bigft", "launch", str(cfg), "--nproc", "2", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return (proc.stdout + proc.stderr).replace("\n", "")


def saved_model_keys(saved: Path) -> set[str]:
    """Names of the model tensors in a DDP, DeepSpeed or FSDP2 (DCP) checkpoint."""
    if (saved / "model.safetensors").is_file():
        return set(load_file(saved / "model.safetensors"))
    if (saved / "pytorch_model_fsdp_0").is_dir():
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(str(saved / "pytorch_model_fsdp_0")).read_metadata()
        return {k.removeprefix("model.") for k in metadata.state_dict_metadata}
    keys = set()
    for file in (saved / "pytorch_model").glob("*model_states.pt"):
        state = torch.load(file, map_location="cpu", weights_only=False)  # ours: trusted
        assert not state.get("frozen_param_fragments"), file
        keys |= set(state["module"])
    return keys


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero3", "fsdp2"])
def test_two_process_checkpoint_leaves_the_base_out_and_resumes(
    strategy: str, tiny_base: Path, data_file: Path, tmp_path: Path
) -> None:
    """2 processes: checkpoints at steps 2 and 4; a copy holding only step 2 resumes to
    step 4 and ends with the same adapter."""
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    cfg = config_file(tmp_path, tiny_base, data_file)
    common = [*METHODS["lora"], f"parallel.strategy={strategy}", "train.steps=4"]
    straight = tmp_path / "straight"
    launch(cfg, *common, f"output_dir={straight}", "checkpoint.every_steps=2")
    summary = json.loads((straight / "summary.json").read_text())
    engine = {"ddp": "MULTI_CPU", "zero3": "DEEPSPEED", "fsdp2": "FSDP"}[strategy]
    assert summary["world_size"] == 2 and summary["engine"]["distributed_type"] == engine

    saved = ckpt.checkpoint_root(straight) / "step-00000002"
    assert saved_model_keys(saved) and all("lora_" in k for k in saved_model_keys(saved))
    adapter, adam, base = 8192 * 4, 2 * 8192 * 4, 86848 * 4  # fp32 bytes
    model_files = [
        *saved.glob("model.safetensors"),
        *saved.glob("pytorch_model/*model_states.pt"),
        *saved.glob("*fsdp_0/*"),
    ]
    weights = sum(f.stat().st_size for f in model_files)
    print(f"{strategy}: checkpoint {disk_bytes(saved)} bytes, model part {weights}")
    # The engines' formats add per-tensor framing (DCP: ~1 KB a tensor) and metadata that
    # outweigh 8,192 adapter weights; the frozen base would add 347 KB.
    assert weights < base
    if strategy == "ddp":
        assert disk_bytes(saved) < 2 * (adapter + adam)
    if strategy == "zero3":  # + an fp32 master copy, RNG states, two helper scripts
        assert disk_bytes(saved) < 3 * (adapter + adam)

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("final", "summary.json"))
    shutil.rmtree(ckpt.checkpoint_root(resumed) / "step-00000004")
    said = launch(cfg, *common, f"output_dir={resumed}")
    assert "resumed from" in said and "at step 2" in said, said[-2000:]
    a = load_file(straight / "final" / "adapter_model.safetensors")
    b = load_file(resumed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
