"""Analytic planner: ZeRO accounting, parameter counts, QLoRA, fitting, speed (no torch)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import yaml

from bigft.errors import ConfigError
from bigft.plan import analytic, get_gpu, load_arch, make_plan, model_states, shipped_archs
from bigft.plan.batch import max_micro_batch, pick_micro_batch, total_bytes, usable_bytes
from bigft.plan.memory import phase_breakdowns, zero_model_states
from bigft.plan.workload import Workload

GB, GIB = 1e9, 1024**3


@pytest.mark.parametrize(("stage", "paper_gb"), [(0, 120), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_figure_1(stage: int, paper_gb: float) -> None:
    # Rajbhandari et al. 2020, Fig. 1: Ψ = 7.5B, N_d = 64, K = 12.
    assert zero_model_states(7.5e9, 64, stage) / GB == pytest.approx(paper_gb, abs=0.05)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_layouts_partition_model_states_like_the_paper(stage: int) -> None:
    work = Workload(arch=load_arch("llama-2-7b"), strategy=f"zero{stage}", gpus_per_node=8, nodes=8)
    ms = model_states(work)
    psi = work.arch.n_params
    assert ms.params + ms.grads + ms.optimizer == pytest.approx(
        zero_model_states(psi, 64, stage), rel=1e-9
    )


@pytest.mark.parametrize(
    ("name", "billions"),
    [
        ("llama-2-7b", 6.738),
        ("llama-2-70b", 68.98),
        ("llama-3.1-8b", 8.030),
        ("llama-3.1-405b", 405.85),
        ("mistral-7b-v0.3", 7.248),
        ("qwen2.5-7b", 7.616),
        ("gemma-2-9b", 9.242),
        ("phi-3-mini-4k", 3.821),
    ],
)
def test_shipped_architectures_have_published_parameter_counts(name: str, billions: float):
    assert load_arch(name).n_params / 1e9 == pytest.approx(billions, rel=2e-3)


def test_hub_ids_and_local_directories_resolve(tmp_path) -> None:
    assert load_arch("meta-llama/Llama-3.1-8B").name == "llama-3.1-8b"
    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, '
        '"num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256}'
    )
    assert (
        load_arch(str(tmp_path)).n_params
        == 2 * 256 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    )
    with pytest.raises(ConfigError, match=r"nearest: llama-3\.1-8b"):
        load_arch("llama-3.1-8")


def test_qlora_7b_base_is_about_5gb_and_fits_a_24gb_card() -> None:
    work = Workload(
        arch=load_arch("llama-2-7b"), method="qlora", seq_len=512, micro_batch=1, grad_ckpt=True
    )
    # QLoRA paper: ~4.1 bits per weight; bf16 embeddings, norms and lm_head on top.
    assert 3.5 * GB < work.base_param_bytes() < 5.0 * GB
    report = make_plan(work, get_gpu("rtx4090"), micro_given=True)
    assert report.fits
    assert report.total < 8 * GIB


def test_full_finetuning_7b_needs_sharding_beyond_one_80gb_card() -> None:
    work = Workload(arch=load_arch("llama-2-7b"), seq_len=2048, micro_batch=1)
    assert not make_plan(work, get_gpu("a100-80"), micro_given=True).fits
    sharded = work.with_(strategy="zero3", gpus_per_node=8)
    assert make_plan(sharded, get_gpu("a100-80"), micro_given=True).fits


def test_large_vocabulary_logits_dominate_long_sequences() -> None:
    work = Workload(
        arch=load_arch("llama-3.1-8b"),
        method="lora",
        seq_len=8192,
        grad_ckpt=True,
        loss_impl="full",
    )
    b = analytic(work)
    assert b.phase == "loss"
    # fp32 log-softmax, its gradient and the input gradient: 12 bytes x vocab x tokens.
    assert b.logits == pytest.approx(12 * 128256 * 8191, rel=1e-6)
    assert b.logits > b.activations


def test_chunked_loss_holds_one_chunk_of_logits() -> None:
    arch = load_arch("llama-3.1-8b")
    work = Workload(arch=arch, method="lora", seq_len=8192, grad_ckpt=True, loss_chunk=256)
    assert work.loss_path == "chunked"  # the default, loss_impl auto
    phases = phase_breakdowns(work)
    # In the head's forward: one chunk's bf16 logits, their fp32 copy, the fp32
    # log-softmax and its gradient (14 bytes x vocab), beside the hidden states' gradient
    # (bf16), which is all that is left for backward.
    hidden_grad = 2 * 4096 * 8192
    assert phases["forward"]["logits"] == pytest.approx(14 * 128256 * 256 + hidden_grad)
    assert phases["loss"]["logits"] == pytest.approx(hidden_grad)
    b, full = analytic(work), analytic(work.with_(loss_impl="full"))
    assert b.phase != "loss"  # the loss no longer sets the peak
    assert full.tensor_peak - b.tensor_peak > 9 * GIB  # 29.4 GiB -> 20.3 GiB


def test_models_that_transform_logits_plan_the_full_loss() -> None:
    gemma = Workload(arch=load_arch("gemma-2-9b"), seq_len=4096)
    assert gemma.loss_path == "full"  # final_logit_softcapping
    with pytest.raises(ConfigError, match="final_logit_softcapping"):
        gemma.with_(loss_impl="chunked")


def test_chosen_micro_batch_fits_and_the_next_does_not() -> None:
    work = Workload(arch=load_arch("llama-2-7b"), method="qlora", seq_len=2048, grad_ckpt=True)
    gpu = get_gpu("rtx4090")
    report = make_plan(work, gpu)
    capacity = usable_bytes(gpu, 0.05)
    assert report.fits and report.micro_batch == report.max_micro_batch >= 1
    assert total_bytes(work.with_(micro_batch=report.micro_batch)) <= capacity
    assert total_bytes(work.with_(micro_batch=report.micro_batch + 1)) > capacity


def test_micro_batch_divides_the_global_batch() -> None:
    assert pick_micro_batch(7, world=2, global_batch=64) == (4, 8)
    assert pick_micro_batch(7, world=1, global_batch=None) == (7, 1)
    assert pick_micro_batch(0, world=8, global_batch=64) == (0, 0)
    work = Workload(arch=load_arch("llama-3.1-8b"), method="lora", seq_len=2048)
    assert max_micro_batch(work, 1.0) == 0


def test_unsupported_layout_suggests_the_nearest_that_fits() -> None:
    work = Workload(
        arch=load_arch("llama-2-7b"),
        method="qlora",
        strategy="zero3-offload",
        seq_len=512,
        grad_ckpt=True,
    )
    with pytest.raises(ConfigError, match=r"not supported.*nearest layout that fits: "):
        make_plan(work, get_gpu("rtx4090"))


def test_a_model_that_fits_nowhere_says_what_would() -> None:
    work = Workload(
        arch=load_arch("llama-3.1-405b"), strategy="zero3", gpus_per_node=8, seq_len=4096
    )
    report = make_plan(work, get_gpu("h100"), micro_given=True)
    assert not report.fits and not any(o.fits for o in report.layouts)
    assert "fits no layout" in report.message and "--grad-ckpt" in report.message
    assert "CPU memory" in next(o.reason for o in report.layouts if o.name == "zero3-offload")


def test_bad_workloads_are_one_line_config_errors() -> None:
    arch = load_arch("llama-2-7b")
    with pytest.raises(ConfigError, match="unknown strategy 'zero4'; choose one of"):
        Workload(arch=arch, strategy="zero4")
    with pytest.raises(ConfigError, match="LoRA target"):
        Workload(arch=arch, method="lora", lora_targets=("qkv",))


def test_any_shipped_model_plans_in_under_half_a_second() -> None:
    gpu = get_gpu("h100")
    for name in shipped_archs():
        work = Workload(
            arch=load_arch(name),
            strategy="zero3",
            gpus_per_node=8,
            nodes=4,
            seq_len=4096,
            grad_ckpt=True,
        )
        start = time.perf_counter()
        make_plan(work, gpu)
        assert time.perf_counter() - start < 0.5, name


def _from_config(tmp_path, **sections: Any) -> Workload:
    from bigft.config_io import load_config
    from bigft.plan import workload_from_config

    cfg: dict[str, Any] = {
        "model": {"name_or_path": "llama-2-7b"},
        "data": {"train": "rows.jsonl"},
        "train": {"seq_len": 2048, "precision": "bf16"},
        "output_dir": str(tmp_path / "out"),
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return workload_from_config(load_config(path))


def test_lora_with_dtype_auto_plans_a_bf16_base(tmp_path) -> None:
    """model.dtype auto under bf16: the frozen base is bf16 (half of fp32), as loaded."""
    lora = {"name": "lora", "gradient_checkpointing": "full"}
    auto = _from_config(tmp_path, method=lora)
    fp32 = _from_config(tmp_path, method=lora, model={"dtype": "float32"})
    bf16 = _from_config(tmp_path, method=lora, model={"dtype": "bfloat16"})
    psi, adapters = auto.arch.n_params, auto.trainable_params
    assert model_states(auto).params == pytest.approx(2 * psi + 4 * adapters)
    assert model_states(fp32).params == pytest.approx(4 * psi + 4 * adapters)
    assert model_states(auto).params / model_states(fp32).params == pytest.approx(0.5, abs=0.01)
    assert analytic(auto).tensor_peak == pytest.approx(analytic(bf16).tensor_peak)
    assert analytic(auto).tensor_peak < 0.6 * analytic(fp32).tensor_peak


def test_freeze_with_dtype_auto_keeps_fp32_master_weights_for_what_trains(tmp_path) -> None:
    work = _from_config(tmp_path, method={"name": "freeze", "train_top_layers": 8})
    psi, trained = work.arch.n_params, work.trainable_params
    ms = model_states(work)
    assert ms.params == pytest.approx(2 * (psi - trained) + 4 * trained)
    assert ms.grads == pytest.approx(4 * trained) and ms.optimizer == pytest.approx(8 * trained)
    full = _from_config(tmp_path)  # full fine-tuning: every weight an fp32 master weight
    assert model_states(full).params == pytest.approx(4 * psi)


def test_qlora_keeps_weights_that_are_not_4bit_in_bf16(tmp_path) -> None:
    """Embeddings, norms and lm_head stay bf16 (no prepare_model_for_kbit_training upcast)."""
    from bigft.plan.workload import NF4_BYTES_PER_PARAM

    work = _from_config(tmp_path, model={"name_or_path": "llama-3.1-8b"}, method={"name": "qlora"})
    a = work.arch
    quantized = a.layers * a.layer_linear_params
    rest = a.n_params - quantized  # embeddings, lm_head and norms: ~1.05B on Llama-3.1-8B
    assert work.base_param_bytes() == pytest.approx(quantized * NF4_BYTES_PER_PARAM + 2 * rest)
    assert 5.0 * GB < work.base_param_bytes() < 6.5 * GB  # "NF4 base ~5.5 GB" on the 4090
