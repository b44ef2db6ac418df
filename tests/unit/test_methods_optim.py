"""Method/optimizer config checks, layer-wise lr groups, every optimizer, shipped configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from bigft.config import Config, MethodConfig, OptimConfig
from bigft.config_io import load_config
from bigft.errors import ConfigError
from bigft.optim import LrRules, build_optimizer, describe_groups, param_groups

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _config(**sections: object) -> Config:
    base = {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "output_dir": "o"}
    return Config.model_validate({**base, **sections})


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ({"name": "freeze"}, "needs freeze_embeddings"),
        ({"name": "lora", "freeze_embeddings": True}, "already frozen"),
        ({"name": "full", "freeze_first_layers": 2}, "use method.name: freeze"),
        ({"name": "freeze", "freeze_first_layers": 1, "train_top_layers": 1}, "not both"),
        ({"name": "full", "lora": {"r": 8}}, "method.name is full"),
        ({"name": "lora", "quant": {"quant_type": "fp4"}}, "not qlora"),
        ({"gradient_checkpointing": "every_k"}, "needs checkpoint_every_k"),
        ({"checkpoint_every_k": 2}, "applies to gradient_checkpointing"),
        ({"offload_activations": True}, "needs gradient_checkpointing"),
        ({"name": "lora", "lora": {"target_modules": []}}, "lists no modules"),
    ],
)
def test_impossible_methods_are_rejected(method: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MethodConfig.model_validate(method)


def test_cross_section_checks() -> None:
    with pytest.raises(ValueError, match="no adapters"):
        _config(optim={"lr_adapters": 1e-3})
    with pytest.raises(ValueError, match="quant_storage"):
        _config(method={"name": "qlora"}, parallel={"strategy": "fsdp2"})
    with pytest.raises(ValueError, match="quant_storage to bfloat16"):
        _config(
            method={"name": "qlora", "quant": {"quant_storage": "float32"}},
            parallel={"strategy": "zero3"},
            train={"precision": "bf16"},
        )
    ok = _config(
        method={"name": "qlora", "quant": {"quant_storage": "bfloat16"}},
        parallel={"strategy": "fsdp2"},
    )
    # the resolved config a run writes (every field spelled out) validates again
    assert Config.model_validate(_config().model_dump()).method.name == "full"
    assert Config.model_validate(ok.model_dump()) == ok


def test_typo_in_method_section_names_the_nearest_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {name_or_path: m}\ndata: {train: t.jsonl}\noutput_dir: o\n"
        "method:\n  name: lora\n  lora: {alpah: 8}\n"
    )
    with pytest.raises(
        ConfigError, match=r"c.yaml:6: method.lora.alpah: unknown key; did you mean 'alpha'"
    ):
        load_config(path)


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    from bigft.tiny import build_tiny_llama

    return build_tiny_llama(vocab_size=100)


def test_layer_decay_groups(tiny_model: torch.nn.Module) -> None:
    rules = LrRules(lr=1.0, layer_decay=0.5)
    groups = param_groups(tiny_model, 0.1, rules)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(tiny_model.named_parameters())
    assert lr_of[id(named["lm_head.weight"])] == 1.0
    assert lr_of[id(named["model.norm.weight"])] == 1.0
    assert lr_of[id(named["model.layers.1.mlp.up_proj.weight"])] == 0.5  # depth 1
    assert lr_of[id(named["model.layers.0.self_attn.q_proj.weight"])] == 0.25  # depth 2
    assert lr_of[id(named["model.embed_tokens.weight"])] == 0.125  # depth L + 1
    # the no-decay rule still holds inside every lr group
    assert wd_of[id(named["model.layers.0.input_layernorm.weight"])] == 0.0
    assert wd_of[id(named["model.layers.0.self_attn.q_proj.weight"])] == 0.1
    assert len(lr_of) == sum(1 for _ in tiny_model.parameters())


def test_part_overrides(tiny_model: torch.nn.Module) -> None:
    rules = LrRules(lr=1.0, layer_decay=0.5, lr_head=3.0, lr_embeddings=2.0)
    groups = param_groups(tiny_model, 0.0, rules)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(tiny_model.named_parameters())
    assert lr_of[id(named["lm_head.weight"])] == 3.0
    assert lr_of[id(named["model.embed_tokens.weight"])] == 2.0


def test_adapter_lr_decays_with_its_layer(tiny_model: torch.nn.Module) -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_model, peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    )
    groups = param_groups(model, 0.0, LrRules(lr=1.0, layer_decay=0.5, lr_adapters=4.0))
    lr_of = {
        n: g["lr"]
        for g in groups
        for n, p in model.named_parameters()
        if any(p is q for q in g["params"])
    }
    assert lr_of["base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"] == 2.0
    assert lr_of["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"] == 1.0
    model.unload()


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd"])
def test_every_optimizer_steps(name: str) -> None:
    if "8bit" in name:
        pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    # 8-bit states apply to tensors of >= 4096 elements; smaller ones stay 32-bit
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.LayerNorm(64))
    optimizer = build_optimizer(model, OptimConfig(name=name, lr=1e-2, weight_decay=0.1))
    before = model[0].weight.detach().clone()
    x = torch.randn(8, 128)
    model(x).pow(2).mean().backward()
    optimizer.step()
    assert not torch.equal(model[0].weight, before)
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay"]
    assert "decay" in describe_groups(optimizer)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.model.name_or_path.startswith("meta-llama/")
    assert cfg.train.precision == "bf16"


def test_configs_cover_the_targets() -> None:
    methods = {
        (c.method.name, c.parallel.strategy) for c in map(load_config, CONFIGS.glob("*.yaml"))
    }
    assert {("qlora", "ddp"), ("lora", "zero2"), ("full", "zero3"), ("qlora", "fsdp2")} <= methods


def test_train_top_layers_zero_trains_head_and_final_norm_only() -> None:
    from bigft.errors import BigftError
    from bigft.model.methods import apply_freezing
    from bigft.tiny import build_tiny_llama

    model = build_tiny_llama(vocab_size=100)
    apply_freezing(model, MethodConfig(name="freeze", train_top_layers=0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lm_head.weight", "model.norm.weight"}
    with pytest.raises(BigftError, match="> the model's 2 layers"):
        apply_freezing(model, MethodConfig(name="freeze", train_top_layers=3))


def test_missing_peft_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from bigft.errors import BigftError
    from bigft.model.methods import apply_adapters

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )
    with pytest.raises(BigftError, match=r"method lora needs .*pip install 'bigft\[lora\]'"):
        apply_adapters(torch.nn.Linear(2, 2), MethodConfig(name="lora"))


def _partition_like_zero3(model: torch.nn.Module) -> None:
    """What zero.Init leaves: every parameter an empty 1-D tensor carrying its full shape
    (`ds_shape`) and size (`ds_numel`); the elements live in per-rank partitions."""
    for param in model.parameters():
        param.ds_shape = param.shape
        param.ds_numel = param.numel()
        param.data = torch.empty(0)


def _table_counts(table: str) -> dict[str, int]:
    rows = re.findall(r"^\s+(\S+)\s+([\d,]+) params", table, re.MULTILINE)
    return {name: int(count.replace(",", "")) for name, count in rows}


def _expected_decay(model: torch.nn.Module) -> tuple[set[str], int]:
    """Matrices (>= 2-D weights other than norms) and their element count."""
    names = {n for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n.lower()}
    return names, sum(p.numel() for n, p in model.named_parameters() if n in names)


def test_zero3_partitioned_params_are_grouped_by_their_full_shape() -> None:
    from bigft.tiny import build_tiny_llama

    model = build_tiny_llama(vocab_size=100)
    decay_names, decay_count = _expected_decay(model)
    total = sum(p.numel() for p in model.parameters())
    _partition_like_zero3(model)
    assert all(p.dim() == 1 for p in model.parameters())  # as the optimizer sees them

    optimizer = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.1))
    groups = {g["name"]: g for g in optimizer.param_groups}
    names_of = {id(p): n for n, p in model.named_parameters()}
    assert {names_of[id(p)] for p in groups["decay"]["params"]} == decay_names
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0
    # the table counts whole parameters, not the empty local tensors
    counts = _table_counts(describe_groups(optimizer))
    assert counts == {"decay": decay_count, "no_decay": total - decay_count}


def test_start_up_table_shows_configured_lr_and_full_counts() -> None:
    """After warmup's first (small) lr is applied and an engine has swapped each group's
    parameters for a flat per-rank partition (ZeRO-1/2), the table still shows the
    configured lr and the whole model's counts."""
    from bigft.config import ScheduleConfig
    from bigft.optim import build_scheduler
    from bigft.tiny import build_tiny_llama

    model = build_tiny_llama(vocab_size=100)
    _, decay_count = _expected_decay(model)
    optimizer = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.1))
    build_scheduler(optimizer, ScheduleConfig(name="cosine", warmup_steps=5), total_steps=20)
    warming_up = optimizer.param_groups[0]["lr"]
    assert warming_up < 3e-3
    for group in optimizer.param_groups:
        full = sum(p.numel() for p in group["params"])
        group["params"] = [torch.zeros(full // 2)]  # this rank's half, flattened
    table = describe_groups(optimizer)
    assert f"lr {warming_up:.3g} " not in table, table
    assert _table_counts(table)["decay"] == decay_count, table
    assert re.search(r"^\s+decay\s+[\d,]+ params  lr 0.003  wd 0.1$", table, re.MULTILINE), table


@pytest.mark.slow  # DeepSpeed compiles its CPU Adam op on first use (cached afterwards)
def test_offloaded_adamw_is_deepspeed_cpu_adam_with_the_same_groups() -> None:
    """Under ZeRO-Offload adamw is DeepSpeed's CPU Adam; per-group lr (layer decay) and
    weight decay still apply: its steps match torch's AdamW on the same groups."""
    pytest.importorskip("deepspeed")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from bigft.tiny import build_tiny_llama

    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, layer_decay=0.5)
    models = [build_tiny_llama(vocab_size=100), build_tiny_llama(vocab_size=100)]
    offloaded = build_optimizer(models[0], cfg, cpu_offload=True)
    reference = build_optimizer(models[1], cfg)
    assert isinstance(offloaded, DeepSpeedCPUAdam)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in offloaded.param_groups] == [
        (g["name"], g["lr"], g["weight_decay"]) for g in reference.param_groups
    ]
    ids = torch.randint(4, 100, (2, 16))
    for _ in range(3):
        for model, optimizer in zip(models, (offloaded, reference), strict=True):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
