"""Every shipped recipe names its hardware and fits it by bigft's own planner."""

from __future__ import annotations

import json
from pathlib import Path

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
