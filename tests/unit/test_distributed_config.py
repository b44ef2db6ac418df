"""DeepSpeed config generation and the checks around it (no processes started)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bigft.config import ParallelConfig, TrainConfig
from bigft.engine.settings import BatchLayout, batch_layout
from bigft.engine.sharding import (
    check_fsdp_layers,
    deepspeed_config,
    fsdp_plugin,
    offload_threads,
    offloads_optimizer_step,
)
from bigft.errors import ConfigError


def make(strategy: str, precision: str = "bf16", **parallel: object) -> dict:
    train = TrainConfig(micro_batch_size=2, grad_accum=4, precision=precision, max_grad_norm=0.5)
    return deepspeed_config(
        ParallelConfig(strategy=strategy, **parallel), train, BatchLayout(2, 4, 8)
    )


def test_generated_zero3_config_is_complete() -> None:
    cfg = make("zero3", offload_optimizer=True, offload_params=True)
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_batch_size"] == 64
    assert cfg["gradient_clipping"] == 0.5
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    # only the bucket sizes wait for the model (accelerate fills them from hidden_size)
    scaled = {
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
    }
    assert {key: zero[key] for key in scaled} == scaled
    rest = {**cfg, "zero_optimization": {k: v for k, v in zero.items() if k not in scaled}}
    assert "auto" not in json.dumps(rest)


def test_explicit_reduce_bucket_sizes_the_stage3_buckets() -> None:
    """accelerate's hidden_size rule with h = sqrt(reduce_bucket_size), nothing left 'auto'."""
    zero = make("zero3", reduce_bucket_size=768 * 768)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 589_824
    assert zero["stage3_prefetch_bucket_size"] == 530_841
    assert zero["stage3_param_persistence_threshold"] == 7_680
    assert "auto" not in json.dumps(zero)
    assert "stage3_prefetch_bucket_size" not in make("zero2")["zero_optimization"]


def test_fp16_uses_dynamic_loss_scaling() -> None:
    cfg = make("zero2", precision="fp16")
    assert cfg["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    assert not cfg["bf16"]["enabled"]
    assert "offload_param" not in cfg["zero_optimization"]


@pytest.mark.parametrize("stage", [1, 2])
def test_stage_from_strategy(stage: int) -> None:
    assert make(f"zero{stage}")["zero_optimization"]["stage"] == stage


def test_user_json_merged_and_checked(tmp_path: Path) -> None:
    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 3, "sub_group_size": 1e8},
                "train_micro_batch_size_per_gpu": "auto",
            }
        )
    )
    cfg = make("zero3", deepspeed_config=str(user))
    assert cfg["zero_optimization"]["sub_group_size"] == 1e8
    assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert cfg["train_micro_batch_size_per_gpu"] == 2

    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu = 16 contradicts"):
        make("zero3", deepspeed_config=str(user))
    user.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="stage = 2 contradicts parallel.strategy"):
        make("zero3", deepspeed_config=str(user))
    user.write_text(json.dumps({"fp16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="fp16.enabled = True contradicts train.precision"):
        make("zero3", deepspeed_config=str(user))
    user.write_text("{bad json")
    with pytest.raises(ConfigError, match=r"ds.json:1: invalid JSON"):
        make("zero3", deepspeed_config=str(user))


def test_world_size_must_divide_global_batch() -> None:
    train = TrainConfig(micro_batch_size=2, global_batch_size=24)
    assert batch_layout(train, world_size=4).grad_accum == 3
    with pytest.raises(ConfigError, match="not a multiple of micro_batch_size 2 x 5"):
        batch_layout(train, world_size=5)


def test_fsdp_unknown_layer_class(tiny_base: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    check_fsdp_layers(model, ParallelConfig(strategy="fsdp2"))  # default: LlamaDecoderLayer
    with pytest.raises(ConfigError, match="GPTBlock not found.*LlamaDecoderLayer"):
        check_fsdp_layers(model, ParallelConfig(strategy="fsdp2", fsdp_layer_cls=["GPTBlock"]))


@pytest.mark.parametrize(
    ("precision", "reduce", "expected"),
    [
        ("bf16", "float32", (torch.bfloat16, torch.float32)),
        ("bf16", "bfloat16", (torch.bfloat16, torch.bfloat16)),
        ("fp16", "float32", (torch.float16, torch.float32)),
        ("no", "float32", None),
    ],
)
def test_fsdp2_plugin_reduces_gradients_in_fp32(
    precision: str, reduce: str, expected: tuple[torch.dtype, torch.dtype] | None
) -> None:
    """The policy survives accelerate's set_mixed_precision (which AcceleratorState calls
    with the Accelerator's mixed_precision, and which would otherwise reduce in bf16)."""
    plugin = fsdp_plugin(ParallelConfig(strategy="fsdp2", fsdp_reduce_dtype=reduce), precision)
    if precision != "no":
        plugin.set_mixed_precision(precision)
    policy = plugin.mixed_precision_policy
    if expected is None:
        assert policy is None
    else:
        assert (policy.param_dtype, policy.reduce_dtype) == expected


def test_offload_thread_count() -> None:
    # this process's share of the cores, unless asked for
    assert offload_threads(None, None, cores=96, local_processes=8) == 12
    assert offload_threads(None, "1", cores=96, local_processes=8) == 12  # a launcher's default
    assert offload_threads(None, "4", cores=96, local_processes=8) == 4  # the user's choice
    assert offload_threads(2, "4", cores=96, local_processes=8) == 2  # parallel.offload_threads
    assert offload_threads(None, None, cores=2, local_processes=4) == 1
    assert offloads_optimizer_step(ParallelConfig(strategy="zero2", offload_optimizer=True))
    assert not offloads_optimizer_step(ParallelConfig(strategy="fsdp2", offload_optimizer=True))
    assert not offloads_optimizer_step(ParallelConfig(strategy="zero3"))
