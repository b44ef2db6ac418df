"""DPO on 2 CPU processes (gloo) under ZeRO-3 and FSDP2: full fine-tuning (the reference
a frozen copy partitioned / sharded like the policy) and QLoRA with bf16 storage (the
reference is the 4-bit base with the adapters disabled). The engine asked for is the one
that ran, both ranks end on the same weights, held-out reward accuracy rises, the export
loads. ZeRO-3 full fine-tuning runs by default; the others with BIGFT_TEST_ENGINES=1."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from bigft.tracking import read_metrics
from tests.helpers import torchrun
from tests.integration.test_preference import pairs

pytestmark = pytest.mark.slow

WORKER = """
import sys, torch
from contextlib import nullcontext
from bigft.config_io import load_config
from bigft.loop.setup import setup
from bigft.loop.train import train

run = setup(load_config(sys.argv[1]))
train(run)
acc = run.accelerator
named = [(n, p) for n, p in acc.unwrap_model(run.model).named_parameters() if p.requires_grad]
gather = nullcontext()
if any(hasattr(p, "ds_numel") for _, p in named):
    import deepspeed
    gather = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
with gather, torch.no_grad():
    state = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).float().cpu().clone()
             for n, p in named}
reference = run.teacher
facts = {"world": acc.num_processes, "reference": type(reference).__name__}
torch.save({"facts": facts, "state": state}, f"{sys.argv[2]}/rank{acc.process_index}.pt")
acc.wait_for_everyone()
torch.distributed.destroy_process_group()
"""

CASES = [
    ("zero3", "full"),
    ("fsdp2", "precomputed"),
    ("fsdp2", "full"),
    ("zero3", "precomputed"),
    ("zero3", "qlora"),
    ("fsdp2", "qlora"),
]
DEFAULT = (("zero3", "full"), ("fsdp2", "precomputed"))


@pytest.mark.parametrize(("strategy", "method"), CASES, ids=[f"{s}-{m}" for s, m in CASES])
def test_dpo_two_processes(strategy: str, method: str, tiny_base: Path, tmp_path: Path) -> None:
    """`precomputed`: full fine-tuning with preference.precompute_reference, scored by
    both processes before step 1 and gathered: no reference model is loaded, and at step
    0 every held-out reward is exactly 0 (each pair got its own values)."""
    if (strategy, method) not in DEFAULT and os.environ.get("BIGFT_TEST_ENGINES") != "1":
        pytest.skip("set BIGFT_TEST_ENGINES=1 to run DPO under every sharded engine (~40 s each)")
    if strategy == "zero3":
        pytest.importorskip("deepspeed")
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs(160)))
    methods = {
        "full": {"name": "full"},
        "precomputed": {"name": "full"},
        "qlora": {
            "name": "qlora",
            "quant": {"compute_dtype": "bfloat16", "quant_storage": "bfloat16"},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        },
    }
    config = {
        "task": "preference",
        "model": {"name_or_path": str(tiny_base)},
        "data": {
            "format": "text",
            "train": str(data),
            "split": {"train": 0.75, "validation": 0.25},
        },
        "preference": {
            "loss": "dpo",
            "beta": 0.1,
            "precompute_reference": method == "precomputed",
        },
        "method": methods[method],
        "optim": {"lr": 2e-3 if method == "qlora" else 5e-4, "weight_decay": 0.0},
        "train": {"micro_batch_size": 4, "steps": 24, "seq_len": 32, "precision": "bf16"},
        "eval": {"at_start": True, "every_steps": 24, "metric": "eval_rewards/accuracy"},
        "parallel": {"strategy": strategy},
        "logging": {"progress_bar": False},
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    proc = subprocess.run(
        torchrun(worker, str(path), str(tmp_path)),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    (tmp_path / "stderr.txt").write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    engine = summary["engine"]
    # each rank holds about half of the parameters (FSDP2 pads uneven dim-0 shards)
    assert engine["world_size"] == 2, engine
    assert engine["param_fraction_local"] == pytest.approx(0.5, abs=0.07), engine
    assert engine["distributed_type"] == ("DEEPSPEED" if strategy == "zero3" else "FSDP")
    expected = {
        "full": {"DeepSpeedEngine", "FSDPLlamaForCausalLM"},
        "precomputed": {"NoneType"},
        "qlora": {"NoneType"},
    }
    assert ranks[0]["facts"]["reference"] in expected[method], ranks[0]["facts"]
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    evals = [r for r in read_metrics(tmp_path / "out") if r.get("split") == "validation"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 24
    assert evals[0]["eval_rewards/accuracy"] == 0.0  # policy == reference: all ties
    assert evals[-1]["eval_rewards/accuracy"] >= 0.8, evals[-1]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    final = tmp_path / "out" / "final"
    if method != "qlora":
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(final)
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(final))


Z0_WORKER = """
import json, sys, torch
import torch.distributed as dist
from bigft.loop.preference import kto_reference_point

dist.init_process_group("gloo")
rank = dist.get_rank()
# policy - reference log-ratios of each process's mismatched rows; rank 1's second row
# is an evaluation filler (no targets) and rank 1 then has a batch of one (no rows)
policy = [torch.tensor([1.0, 2.0]), torch.tensor([10.0, 99.0])][rank]
real = [torch.tensor([True, True]), torch.tensor([True, False])][rank]
first = kto_reference_point(policy, torch.zeros(2), real)
none = kto_reference_point(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.bool))
lonely = kto_reference_point(policy[:1], torch.zeros(1), torch.tensor([rank == 0]))
with open(f"{sys.argv[1]}/z0-{rank}.json", "w") as f:
    json.dump([first.item(), none.item(), lonely.item()], f)
dist.destroy_process_group()
"""


def test_kto_reference_point_is_shared_by_the_processes(tmp_path: Path) -> None:
    """KTO's z0 is the mean log-ratio of the real mismatched rows of every process (TRL
    gathers it), so the processes train against one reference point."""
    worker = tmp_path / "z0.py"
    worker.write_text(Z0_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    proc = subprocess.run(
        torchrun(worker, str(tmp_path)), capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads((tmp_path / f"z0-{r}.json").read_text()) for r in (0, 1)]
    # (1 + 2 + 10) / 3 real rows; no rows anywhere -> 0; rank 0's single row only -> 1
    assert seen[0] == seen[1] == pytest.approx([13 / 3, 0.0, 1.0])
