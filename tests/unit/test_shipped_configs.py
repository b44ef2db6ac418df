"""Every shipped recipe names its hardware and fits it by bigft's own planner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from bigft.commands import app
from bigft.config_io import load_config
from bigft.errors import ConfigError
from bigft.plan import get_gpu

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted([*ROOT.glob("configs/*.yaml"), *ROOT.glob("slurm/examples/*.yaml")])


def test_recipes_are_found() -> None:
    assert len(SHIPPED) >= 7, SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_config_fits_the_hardware_it_names(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.hardware.gpu is not None, f"{path.name}: set hardware.gpu"
    gpu = get_gpu(cfg.hardware.gpu)
    # `bigft plan CONFIG` with no --gpu / --gpus-per-node / --nodes plans for that hardware.
    result = CliRunner().invoke(app, ["plan", str(path), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["gpu"]["name"] == gpu.name
    nodes = cfg.hardware.nodes or cfg.slurm.nodes
    gpus_per_node = cfg.hardware.gpus_per_node or cfg.slurm.gpus_per_node or 1
    assert (plan["nodes"], plan["gpus_per_node"]) == (nodes, gpus_per_node)
    assert plan["fits"] is True, plan.get("message")
    assert plan["per_gpu_bytes"]["total"] <= gpu.memory_bytes
    assert plan["micro_batch_size"] == cfg.train.micro_batch_size  # the recipe's own batch


def _write(tmp_path: Path, **sections: dict) -> Path:
    cfg = {
        "model": {"name_or_path": "llama-3.1-8b"},
        "data": {"train": "rows.jsonl"},
        "output_dir": str(tmp_path / "out"),
        **sections,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_hardware_names_are_checked_with_a_suggestion(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, hardware={"gpu": "H100-80GB", "gpus_per_node": 8}))
    assert cfg.hardware.gpu == "h100-80"  # stored by its catalogue name
    with pytest.raises(ConfigError, match=r"hardware\.gpu: unknown GPU 'a100-8O'; nearest: a100"):
        load_config(_write(tmp_path, hardware={"gpu": "a100-8O"}))
    with pytest.raises(
        ConfigError, match=r"hardware.gpu_per_node: unknown key; did you mean 'gpus_per_node'"
    ):
        load_config(_write(tmp_path, hardware={"gpu_per_node": 8}))
    with pytest.raises(ConfigError, match=r"hardware\.nodes 2 and slurm\.nodes 4 disagree"):
        load_config(_write(tmp_path, hardware={"nodes": 2}, slurm={"nodes": 4}))


def test_plan_uses_the_named_hardware_unless_flags_say_otherwise(tmp_path: Path) -> None:
    path = _write(tmp_path, method={"name": "qlora"}, hardware={"gpu": "rtx4090"})
    plan = json.loads(CliRunner().invoke(app, ["plan", str(path), "--json"]).stdout)
    assert plan["gpu"]["name"] == "rtx4090" and plan["gpus_per_node"] == 1
    flagged = CliRunner().invoke(
        app, ["plan", str(path), "--gpu", "a100-80", "--gpus-per-node", "2", "--json"]
    )
    plan = json.loads(flagged.stdout)
    assert plan["gpu"]["name"] == "a100-80" and plan["gpus_per_node"] == 2


def test_the_8b_4090_recipe_plans_the_chunked_loss() -> None:
    path = ROOT / "configs" / "llama3.1-8b-qlora-4090.yaml"
    result = CliRunner().invoke(app, ["plan", str(path), "--json", "--micro-batch", "1"])
    plan = json.loads(result.stdout)
    assert plan["seq_len"] == 4096 and plan["fits"] is True
    from bigft.plan import workload_from_config
    from bigft.plan.memory import phase_breakdowns

    work = workload_from_config(load_config(path), micro_batch=1)
    assert work.loss_path == "chunked"

    # The logits / loss term at 4,096 tokens: 6.3 GB with the full logits.
    def term(w: Any) -> float:
        phases = phase_breakdowns(w)
        return max(phases[p]["logits"] for p in ("forward", "loss", "lm_head"))

    assert term(work) < 0.6e9
    assert term(work.with_(loss_impl="full")) > 6e9


EXAMPLES = sorted(ROOT.glob("configs/examples/*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_are_valid(path: Path) -> None:
    """configs/examples: one per task beyond causal LM (image classification, CLIP,
    preference); the digits ones run in tests/integration/test_readme_commands.py."""
    cfg = load_config(path)
    assert cfg.task in ("image_classification", "contrastive", "preference"), path


def test_every_task_has_an_example() -> None:
    tasks = {load_config(p).task for p in EXAMPLES}
    assert tasks >= {"image_classification", "contrastive", "preference"}
