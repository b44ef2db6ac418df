"""The planner for task preference: two sequences a pair, full logits, and the reference
model only where one is loaded (full fine-tuning with dpo / ipo / kto)."""

from __future__ import annotations

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
