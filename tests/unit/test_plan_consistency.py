"""The planner does not contradict itself: one GPU shards nothing, a classifier has no
vocabulary logits, layouts that move more bytes are slower, and the GPU planned for is
the one the config names."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from bigft.commands import app
from bigft.config_io import load_config
from bigft.errors import ConfigError
from bigft.plan import analytic, choose_micro_batch, get_gpu, workload_from_config
from bigft.plan.batch import rank_layouts, step_seconds
from bigft.plan.engines import MIN_TERM, differences_from_ddp
from bigft.plan.memory import COMPONENTS, phase_breakdowns
from bigft.plan.workload import Workload

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
QLORA_4090 = ("llama3.1-8b-qlora-4090.yaml", "llama2-7b-qlora-4090.yaml")
CLASSIFIER = CONFIGS / "llama3.1-8b-lora-classification-4090.yaml"
GIB = 1024**3


def _plan(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(app, ["plan", *args, "--json"])
    assert result.exit_code in (0, 2), result.output
    return json.loads(result.stdout)


def _text(*args: str) -> str:
    result = CliRunner().invoke(app, ["plan", *args], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    return " ".join(result.stdout.split())


# ---- 1. one GPU: ZeRO / FSDP2 plan DDP's states, apart from named engine terms ----------


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3", "fsdp2"])
@pytest.mark.parametrize("name", QLORA_4090)
def test_one_gpu_layouts_differ_from_ddp_only_by_named_terms(
    name: str, strategy: str, dtype: str
) -> None:
    cfg = load_config(CONFIGS / name, [f"model.dtype={dtype}"])
    ddp = workload_from_config(cfg, strategy="ddp")
    work = ddp.with_(strategy=strategy)
    assert work.world_size == 1
    mine, base = analytic(work), analytic(ddp)
    terms = differences_from_ddp(work)
    named = {reason.split(":")[0] for reason, _ in terms}
    for component in ("params", "grads", "optimizer", "buffers"):
        delta = getattr(mine, component) - getattr(base, component)
        # Within 5 MiB, or explained by a named term of the same component.
        component_name = {"params": "weights", "grads": "gradients"}.get(component, component)
        assert abs(delta) < MIN_TERM or component_name in named, (component, delta / GIB)
    activations = mine.activations + mine.logits - base.activations - base.logits
    assert abs(activations) < MIN_TERM or "activations" in named
    # The named terms add up to the whole difference.
    total = sum(delta for _, delta in terms)
    assert abs(total - (mine.tensor_peak - base.tensor_peak)) < len(COMPONENTS) * MIN_TERM
    n_t = work.trainable_params
    if strategy == "fsdp2":
        # FSDP2 stores frozen weights as loaded and trainable ones in fp32: DDP's weights.
        assert mine.params == pytest.approx(base.params, rel=1e-6)
    else:
        # DeepSpeed's bf16 engine: the module's adapters in bf16, frozen weights in bf16.
        assert mine.params < base.params
    if dtype == "bfloat16":
        # As shipped, what remains is engine overhead of a ~40M-parameter adapter:
        # DeepSpeed's fp32 masters (4 bytes each), buckets, the gathered layer.
        assert abs(mine.tensor_peak - base.tensor_peak) < 0.35 * GIB
        if strategy in ("zero1", "zero2"):
            assert mine.params == pytest.approx(base.params - 2.0 * n_t, rel=1e-6)
            assert mine.activations == pytest.approx(base.activations, rel=0.01)


def test_fsdp2_keeps_an_explicit_fp32_base_like_ddp() -> None:
    cfg = load_config(CONFIGS / QLORA_4090[0], ["model.dtype=float32"])
    ddp = analytic(workload_from_config(cfg, strategy="ddp"))
    fsdp2 = analytic(workload_from_config(cfg, strategy="fsdp2"))
    zero1 = analytic(workload_from_config(cfg, strategy="zero1"))
    assert fsdp2.params == pytest.approx(ddp.params, rel=1e-6)
    # DeepSpeed does cast the module: about 1B fp32 embedding / head weights become bf16.
    assert ddp.params - zero1.params > 1.9 * GIB


def test_the_plan_names_the_one_gpu_difference() -> None:
    text = _text(str(CONFIGS / QLORA_4090[0]), "--strategy", "zero1", "model.dtype=float32")
    assert "zero1 on one GPU partitions nothing" in text
    assert "weights: DeepSpeed casts the module to bf16" in text
    assert "activations: the bf16 module runs without autocast" in text
    plan = _plan(str(CONFIGS / QLORA_4090[0]), "--strategy", "zero2")
    assert any("against ddp" in note and "reduce buckets" in note for note in plan["notes"])


# ---- 2. a classification head's logits are a few per position -------------------------


def _logits_term(work: Workload) -> float:
    phases = phase_breakdowns(work)
    return max(phases[p]["logits"] for p in ("forward", "loss", "lm_head"))


def test_classification_plans_the_heads_logits_not_the_vocabulary() -> None:
    cfg = load_config(CLASSIFIER)
    work = workload_from_config(cfg)
    assert work.arch.num_labels is not None and work.arch.head_outputs < 1000
    as_lm = work.with_(arch=replace(work.arch, num_labels=None), loss_impl="full")
    cls, lm = analytic(work), analytic(as_lm)
    assert _logits_term(work) < 0.01 * GIB  # B x L x classes
    logits = _logits_term(as_lm)
    assert logits > 2 * GIB  # B x L x 128k vocabulary
    # Below the causal-LM plan by about its logits, and at most those plus the lm_head.
    lm_head = 2.0 * as_lm.arch.vocab * as_lm.arch.hidden
    saved = lm.tensor_peak - cls.tensor_peak
    assert 0.9 * logits < saved < logits + lm_head + 0.05 * GIB
    # Against the chunked LM loss the classifier still saves the lm_head's weights.
    chunked = analytic(as_lm.with_(loss_impl="auto"))
    assert chunked.tensor_peak - cls.tensor_peak > 0.9 * lm_head


def test_classes_come_from_label_names_and_regression_has_one_output(tmp_path: Path) -> None:
    cfg = load_config(CLASSIFIER, ["data.label_names=[a,b,c]"])
    assert workload_from_config(cfg).arch.num_labels == 3
    plan = _plan(str(CLASSIFIER), "data.label_names=[a,b,c]")
    assert any("sequence head of 3 output" in note for note in plan["notes"])
    raw = yaml.safe_load(CLASSIFIER.read_text())
    raw.update(task="regression", eval={"every_steps": 100, "metric": "eval_mse"})
    raw["checkpoint"]["load_best_at_end"] = False
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert workload_from_config(load_config(path)).arch.num_labels == 1


# ---- 3. relative step time: a model, not a constant -----------------------------------


def _times(path: Path) -> dict[str, tuple[int, float]]:
    plan = _plan(str(path))
    return {
        s["name"]: (s["micro_batch_size"], s["relative_step_time"])
        for s in plan["strategies"]
        if s["fits"]
    }


def test_ranking_times_differ_and_order_by_bytes_moved() -> None:
    for name in ("llama3.1-8b-lora-8xa100-zero2.yaml", "llama3.1-8b-full-2x8h100-zero3.yaml"):
        times = _times(CONFIGS / name)
        assert len({t for _, t in times.values()}) > 1, times
        assert min(t for _, t in times.values()) == 1.0
        # Same micro-batch: offload is slower than no offload, ZeRO-3 than ZeRO-2.
        assert times["zero3-offload"][0] == times["zero3"][0] == times["zero2"][0]
        assert times["zero3-offload"][1] > times["zero3"][1] > times["zero2"][1], times
    # One GPU: no collectives, but offload still pays PCIe and the CPU optimizer step.
    single = _times(CLASSIFIER)
    assert single["zero3-offload"][1] > single["ddp"][1] == 1.0


def test_step_time_is_monotone_on_one_node() -> None:
    cfg = load_config(CONFIGS / "llama3.1-8b-lora-8xa100-zero2.yaml")
    work = workload_from_config(cfg, micro_batch=2)
    gpu = get_gpu("a100-80")
    t = {s: step_seconds(work.with_(strategy=s), gpu, 8) for s in ("zero2", "zero3")}
    t["offload"] = step_seconds(work.with_(strategy="zero3-offload"), gpu, 8)
    assert t["offload"] > t["zero3"] > t["zero2"]
    layouts = rank_layouts(work, gpu, 0.05, 128)
    assert len({round(o.relative, 3) for o in layouts if o.fits}) > 1


# ---- 4. the hardware the config names ----------------------------------------------


def _write(tmp_path: Path, **sections: Any) -> Path:
    cfg = {
        "model": {"name_or_path": "llama-3.1-8b"},
        "data": {"train": "rows.jsonl"},
        "method": {"name": "qlora", "gradient_checkpointing": "full"},
        "train": {"seq_len": 2048, "micro_batch_size": "auto", "global_batch_size": 16},
        "output_dir": str(tmp_path / "out"),
        **sections,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_hardware_section_refuses_unknown_keys_and_gpus(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, hardware={"gpu": "RTX 4090", "nodes": 1}))
    assert (cfg.hardware.gpu, cfg.hardware.nodes) == ("rtx4090", 1)
    with pytest.raises(ConfigError, match=r"hardware\.gpu: unknown GPU 'rtx5090'.*known: "):
        load_config(_write(tmp_path, hardware={"gpu": "rtx5090"}))
    with pytest.raises(ConfigError, match=r"hardware\.gpus: unknown key"):
        load_config(_write(tmp_path, hardware={"gpus": 8}))
    with pytest.raises(ConfigError, match=r"hardware\.gpus_per_node"):
        load_config(_write(tmp_path, hardware={"gpus_per_node": 0}))


def test_plan_says_where_the_gpu_came_from(tmp_path: Path) -> None:
    path = str(_write(tmp_path, hardware={"gpu": "rtx4090"}))
    plan = _plan(path)
    assert plan["gpu"]["name"] == "rtx4090"
    assert plan["gpu"]["source"] == "from hardware.gpu in the config"
    assert "gpu: rtx4090 (from hardware.gpu in the config)" in _text(path)
    flagged = _plan(path, "--gpu", "a100-80")
    assert (flagged["gpu"]["name"], flagged["gpu"]["source"]) == ("a100-80", "--gpu")
    bare = str(_write(tmp_path))
    assert "gpu: h100-80 (default: h100-80; set hardware.gpu or pass --gpu)" in _text(bare)


def test_auto_micro_batch_plans_for_the_config_gpu_without_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BIGFT_PLAN_GPU_MEM_GIB", raising=False)
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is what `auto` plans for when there is one")
    cfg = load_config(_write(tmp_path, hardware={"gpu": "rtx4090"}))
    micro, report = choose_micro_batch(cfg, world_size=1)
    assert report.gpu.name == "rtx4090" and report.fits and micro > 1
    assert "hardware.gpu" in (report.message or "")
    assert micro == _plan(str(_write(tmp_path, hardware={"gpu": "rtx4090"})))["micro_batch_size"]
