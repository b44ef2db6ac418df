"""Image tasks on 2 CPU processes (gloo): image classification under DDP and ZeRO-2,
contrastive under DDP with negatives gathered across processes. Both ranks end with the
same weights, and the engine that ran is the one asked for."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from bigft.digits import NAMES, save_resnet_base, write_digits
from tests.helpers import torchrun

SCRIPT = """
import json, sys, torch
from bigft.config_io import load_config
from bigft.loop.setup import setup
from bigft.loop.train import train
run = setup(load_config(sys.argv[1]))
summary = train(run)
acc = run.accelerator
state = {n: p.detach().clone() for n, p in acc.unwrap_model(run.model).named_parameters()
         if p.requires_grad}
facts = {"world": acc.num_processes, "engine": type(run.model).__name__,
         "distributed": str(acc.distributed_type), "validation": summary.get("validation")}
torch.save({"facts": facts, "state": state}, f"{sys.argv[2]}/rank{acc.process_index}.pt")
acc.wait_for_everyone()
torch.distributed.destroy_process_group()
"""


def two_processes(tmp_path: Path, config: dict) -> list[dict]:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config))
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    proc = subprocess.run(
        torchrun(str(script), str(cfg), str(tmp_path)),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]


def assert_same_weights(ranks: list[dict]) -> None:
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_image_classification_two_processes(strategy: str, tmp_path: Path) -> None:
    if strategy == "zero2":
        pytest.importorskip("deepspeed")
    classes = [NAMES[d] for d in range(5)]
    data = write_digits(tmp_path / "digits", range(5), size=16, limit=40)
    base = save_resnet_base(tmp_path / "base", classes, size=16)
    ranks = two_processes(
        tmp_path,
        {
            "task": "image_classification",
            "model": {"name_or_path": str(base)},
            "data": {
                "train": str(data),
                "label_names": classes,
                "split": {"train": 0.8, "validation": 0.2},
                "augment": {"image": {"rotation": 10}},
            },
            "optim": {"lr": 3e-3, "weight_decay": 0.0},
            "train": {"micro_batch_size": 8, "steps": 30, "seed": 0},
            "eval": {"every_steps": 15},
            "parallel": {"strategy": strategy},
            "logging": {"progress_bar": False},
            "output_dir": str(tmp_path / "out"),
        },
    )
    facts = [r["facts"] for r in ranks]
    assert [f["world"] for f in facts] == [2, 2]
    expected = "DeepSpeedEngine" if strategy == "zero2" else "DistributedDataParallel"
    assert all(f["engine"] == expected for f in facts), facts
    engine = json.loads((tmp_path / "out" / "summary.json").read_text())["engine"]
    assert engine["world_size"] == 2
    if strategy == "zero2":  # ZeRO-2 really partitioned the optimizer states
        assert (engine["distributed_type"], engine["zero_stage"]) == ("DEEPSPEED", 2), engine
    assert_same_weights(ranks)
    # 40 validation images over 5 classes: well above chance (0.2) after 30 steps.
    assert facts[0]["validation"]["eval_accuracy"] >= 0.6
    assert facts[0]["validation"] == facts[1]["validation"]
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_contrastive_two_processes(tmp_path: Path) -> None:
    from bigft.tiny_clip import save_tiny_clip

    data = write_digits(tmp_path / "digits", layout="jsonl", size=16, limit=12)
    base = save_tiny_clip(tmp_path / "clip", [f"a photo of the digit {n}" for n in NAMES], 16)
    ranks = two_processes(
        tmp_path,
        {
            "task": "contrastive",
            "model": {"name_or_path": str(base)},
            "data": {
                "train": str(data),
                "label_names": list(NAMES),
                "split": {"train": 0.8, "validation": 0.2},
            },
            "contrastive": {"prompt": "a photo of the digit {label}", "classification_weight": 0.5},
            "optim": {"lr": 5e-3, "weight_decay": 0.0},
            "train": {"micro_batch_size": 8, "steps": 10, "seq_len": 16},
            "eval": {"every_steps": 10, "metric": "eval_i2t_r1"},
            "logging": {"progress_bar": False},
            "output_dir": str(tmp_path / "out"),
        },
    )
    facts = [r["facts"] for r in ranks]
    assert [f["world"] for f in facts] == [2, 2]
    assert all(f["engine"] == "DistributedDataParallel" for f in facts)
    assert_same_weights(ranks)
    assert any(name.endswith("logit_scale") for name in ranks[0]["state"])
    assert facts[0]["validation"] == facts[1]["validation"]
    assert facts[0]["validation"]["eval_examples"] == 24  # every held-out pair, once
