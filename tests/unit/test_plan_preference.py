"""The planner for task preference: two sequences a pair, full logits, and the reference
model only where one is loaded (full fine-tuning with dpo / ipo / kto)."""

from __future__ import annotations

import json

import pytest

from bigft.config import Config
from bigft.plan import load_arch, model_states
from bigft.plan.from_config import workload_from_config


def config(loss: str, method: str, strategy: str) -> Config:
    return Config(
        task="preference",
        model={"name_or_path": "meta-llama/Llama-3.1-8B"},
        data={"train": "pairs.jsonl", "format": "chat"},
        preference={"loss": loss},
        method={"name": method},
        train={"micro_batch_size": 2, "seq_len": 1024, "precision": "bf16"},
        parallel={"strategy": strategy},
        hardware={"gpu": "h100-80gb", "gpus_per_node": 8},
        output_dir="/tmp/run",
    )


@pytest.mark.parametrize("strategy", ["ddp", "zero3", "fsdp2"])
def test_full_dpo_adds_a_reference_copy_sharded_like_the_policy(strategy: str) -> None:
    with_ref = workload_from_config(config("dpo", "full", strategy))
    without = workload_from_config(config("simpo", "full", strategy))
    assert with_ref.micro_batch == 4 and with_ref.loss_impl == "full"  # 2 pairs, 4 sequences
    assert with_ref.reference_copy and not without.reference_copy
    n = load_arch("meta-llama/Llama-3.1-8B").n_params
    share = 1 if strategy == "ddp" else 8
    extra = model_states(with_ref).params - model_states(without).params
    assert extra == pytest.approx(2.0 * n / share)  # bf16 weights, partitioned or whole


def test_lora_dpo_loads_no_reference() -> None:
    work = workload_from_config(config("dpo", "lora", "ddp"))
    assert not work.reference_copy and work.arch.num_labels is None


@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_precomputed_reference_plans_one_model(strategy: str) -> None:
    """preference.precompute_reference: full DPO holds the policy only, as SimPO does."""
    precomputed = config("dpo", "full", strategy)
    precomputed.preference.precompute_reference = True
    work = workload_from_config(precomputed)
    reference_free = workload_from_config(config("simpo", "full", strategy))
    assert not work.reference_copy
    assert model_states(work) == model_states(reference_free)


def test_auto_micro_batch_is_in_pairs() -> None:
    """train.micro_batch_size auto: the planner sizes sequences, the run takes pairs, so
    the pairs it is given put at most the largest fitting number of sequences through."""
    from bigft.plan import choose_micro_batch
    from bigft.plan.hardware import GIB

    cfg = config("dpo", "lora", "ddp")
    cfg.train.micro_batch_size = "auto"
    pairs, report = choose_micro_batch(cfg, 8, gpu_mem_bytes=80 * GIB)
    assert report.max_micro_batch >= 4  # sequences: not a trivial answer
    assert pairs == report.max_micro_batch // 2
    cfg.train.global_batch_size = 8 * 6  # pairs per step: 6 per GPU
    pairs, _ = choose_micro_batch(cfg, 8, gpu_mem_bytes=80 * GIB)
    assert 2 * pairs <= report.max_micro_batch and 6 % pairs == 0


def test_plan_command_counts_the_global_batch_in_sequences(tmp_path) -> None:
    """`bigft plan` of a preference config: 2 pairs a GPU x 8 GPUs and a global batch of
    128 pairs is 8 accumulation steps (the plan shows 4 sequences x 8 x 8 = 256)."""
    import yaml
    from typer.testing import CliRunner

    from bigft.commands import app

    cfg = {
        "task": "preference",
        "model": {"name_or_path": "meta-llama/Llama-3.1-8B"},
        "data": {"train": "pairs.jsonl", "format": "chat"},
        "method": {"name": "lora"},
        "train": {"micro_batch_size": 2, "global_batch_size": 128, "seq_len": 1024},
        "hardware": {"gpu": "h100-80gb", "gpus_per_node": 8},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["plan", str(path), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["grad_accum"] == 8 and plan["micro_batch_size"] == 4, plan
    assert plan["global_batch_size"] == 256  # sequences: 128 pairs
