"""QLoRA on 2 CPU processes (gloo): DDP always; ZeRO-2 with BIGFT_TEST_ENGINES=1 (~30 s).

ZeRO-3 and FSDP2, which shard the 4-bit weights themselves, are tested in the default
suite with bf16 storage and checked on numbers in test_qlora_sharded.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import alpaca_rows, torchrun, write_config, write_jsonl

pytest.importorskip("bitsandbytes")

SCRIPT = """
import sys, torch
from bigft.config_io import load_config
from bigft.loop.setup import setup
from bigft.loop.train import train
run = setup(load_config(sys.argv[1]))
train(run)
acc = run.accelerator
state = {n: p.detach().clone() for n, p in acc.unwrap_model(run.model).named_parameters()
         if p.requires_grad}
out = f"{sys.argv[2]}/rank{acc.process_index}.pt"
torch.save({"world": acc.num_processes, "state": state}, out)
acc.wait_for_everyone()
torch.distributed.destroy_process_group()  # no gloo thread left running at exit
"""


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_qlora_two_processes(strategy: str, tiny_base: Path, tmp_path: Path) -> None:
    if strategy != "ddp" and os.environ.get("BIGFT_TEST_ENGINES") != "1":
        pytest.skip("set BIGFT_TEST_ENGINES=1 to run QLoRA under ZeRO-2 (~30 s)")
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(48))
    cfg = write_config(
        tmp_path / "cfg.yaml",
        tiny_base,
        data,
        method={
            "name": "qlora",
            "quant": {"compute_dtype": "float32", "quant_storage": "uint8"},
            "gradient_checkpointing": "full",
        },
        train={"seq_len": 64, "micro_batch_size": 2, "steps": 3, "precision": "fp32", "seed": 0},
        eval={"every_steps": 2},  # an eval pass mid-training under DDP too
        parallel={"strategy": strategy},
    )
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    proc = subprocess.run(
        torchrun(str(script), str(cfg), str(tmp_path)),
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").is_file()
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys() and any("lora_" in n for n in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
