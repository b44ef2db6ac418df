"""`bigft plan` through the real CLI: JSON output, clear one-line errors, no torch at --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bigft.commands import app
from bigft.config_io import load_config
from bigft.plan import choose_micro_batch

runner = CliRunner()


def _plan(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["plan", *args])


def test_json_has_the_promised_fields() -> None:
    result = _plan(
        "--model",
        "llama-3.1-8b",
        "--method",
        "lora",
        "--gpu",
        "a100-80",
        "--seq-len",
        "4096",
        "--grad-ckpt",
        "--global-batch",
        "64",
        "--json",
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    per_gpu = plan["per_gpu_bytes"]
    assert {"params", "grads", "optimizer", "activations", "total"} <= set(per_gpu)
    assert all(isinstance(v, int) for v in per_gpu.values())
    parts = ("params", "grads", "optimizer", "activations", "buffers", "overhead")
    assert sum(per_gpu[k] for k in parts) == pytest.approx(per_gpu["total"], abs=8)
    assert plan["fits"] is True and plan["micro_batch_size"] >= 1
    assert plan["micro_batch_size"] * plan["grad_accum"] == 64
    names = [s["name"] for s in plan["strategies"]]
    assert sorted(names) == sorted(["ddp", "zero1", "zero2", "zero3", "zero3-offload", "fsdp2"])
    assert all({"name", "fits", "total_bytes"} <= set(s) for s in plan["strategies"])


def test_table_names_every_component(tmp_path: Path) -> None:
    result = _plan(
        "--model",
        "llama-2-7b",
        "--method",
        "qlora",
        "--gpu",
        "rtx4090",
        "--seq-len",
        "512",
        "--grad-ckpt",
    )
    assert result.exit_code == 0, result.output
    for label in (
        "parameters",
        "gradients",
        "optimizer states",
        "activations",
        "logits",
        "framework buffers",
        "CUDA context",
        "fits",
        "layouts",
    ):
        assert label in result.stdout


def test_config_file_and_overrides(tmp_path: Path) -> None:
    cfg = {
        "model": {"name_or_path": "llama-3.1-8b"},
        "data": {"train": "rows.jsonl"},
        "train": {"seq_len": 1024, "micro_batch_size": 2, "global_batch_size": 32},
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = _plan(
        str(path),
        "train.seq_len=2048",
        "--strategy",
        "zero3",
        "--gpus-per-node",
        "8",
        "--gpu",
        "h100",
        "--json",
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert (plan["seq_len"], plan["micro_batch_size"], plan["grad_accum"]) == (2048, 2, 2)
    assert plan["strategy"] == "zero3" and plan["gpus_per_node"] == 8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu", "h1000"], "unknown GPU 'h1000'; nearest: h100"),
        (["--model", "llama-9b"], "not a local model directory nor a shipped architecture"),
        (
            ["--method", "qlora", "--strategy", "zero3-offload", "--gpu", "rtx4090"],
            "not supported: ZeRO-3 parameter offload cannot move bitsandbytes 4-bit weights to "
            "the CPU; nearest layout that fits: ",
        ),
        (["--model", "llama-3.1-405b", "--gpu", "rtx4090"], "fits no layout on 1 x rtx4090"),
        (["--gpu-mem", "80", "--micro-batch", "1"], "nearest layout that fits: zero3-offload"),
        (["--strategy", "zero4"], "unknown strategy 'zero4'"),
        (["--gpu", "h100", "--gpu-mem", "80"], "pass --gpu or --gpu-mem, not both"),
        (["--gpu-mem", "nan"], "--gpu-mem nan: must be a positive number of GiB"),
        (["--gpu-mem", "inf"], "--gpu-mem inf: must be a positive number of GiB"),
        (["--gpu-mem", "0"], "--gpu-mem 0: must be a positive number of GiB"),
        (["--gpu-mem", "-1"], "--gpu-mem -1: must be a positive number of GiB"),
        (["--cpu-mem", "nan"], "--cpu-mem nan: must be a positive number of GiB"),
        (["--lora-rank", "0"], "--lora-rank 0: must be at least 1"),
        (["--seq-len", "-5"], "--seq-len -5: must be at least 1"),
        (["--micro-batch", "0"], "--micro-batch 0: must be at least 1"),
        (["--global-batch", "-1"], "--global-batch -1: must be at least 1"),
        (["--nodes", "0"], "--nodes 0: must be at least 1"),
        (["--gpus-per-node", "0"], "--gpus-per-node 0: must be at least 1"),
        (["--margin", "nan"], "--margin nan: must be a fraction in [0, 1)"),
        (["--margin", "1"], "--margin 1: must be a fraction in [0, 1)"),
    ],
)
def test_bad_input_is_one_clear_line(args: list[str], message: str) -> None:
    if "--model" not in args:
        args = ["--model", "llama-2-7b", *args]
    result = _plan(*args)
    assert result.exit_code == 2, result.output
    error = result.stderr.strip()
    assert error.startswith("error:") and "Traceback" not in result.output
    assert message in " ".join(error.split())


def test_json_of_a_plan_that_does_not_fit_exits_2() -> None:
    result = _plan("--model", "llama-2-7b", "--gpu", "a100-80", "--micro-batch", "1", "--json")
    assert result.exit_code == 2
    plan = json.loads(result.stdout)
    assert plan["fits"] is False and "nearest layout that fits" in plan["message"]


def test_simulate_adds_measured_columns() -> None:
    result = _plan(
        "--model",
        "qwen2.5-0.5b",
        "--method",
        "lora",
        "--gpu",
        "l4",
        "--seq-len",
        "1024",
        "--micro-batch",
        "2",
        "--simulate",
        "--json",
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    simulated = plan["simulated"]["per_gpu_bytes"]["tensor_peak"]
    assert abs(simulated - plan["per_gpu_bytes"]["tensor_peak"]) < 0.10 * simulated


def test_choose_micro_batch_for_auto(tmp_path: Path) -> None:
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": "llama-3.1-8b"},
                "data": {"train": "rows.jsonl"},
                "train": {"seq_len": 2048, "micro_batch_size": "auto", "global_batch_size": 64},
                "output_dir": str(tmp_path / "out"),
            }
        )
    )
    cfg = load_config(cfg_path)
    micro, report = choose_micro_batch(cfg, world_size=8, gpu_mem_bytes=80 * 1024**3)
    assert micro == report.micro_batch and report.fits is False  # full 8B on ddp: no fit
    assert "nearest layout that fits" in report.message
    cfg.model.name_or_path = "llama-3.2-1b"
    micro, report = choose_micro_batch(cfg, world_size=8, gpu_mem_bytes=80 * 1024**3)
    assert report.fits and micro >= 1 and 64 % (micro * 8) == 0
    micro, report = choose_micro_batch(cfg, world_size=1, gpu_mem_bytes=None)
    if report.gpu.memory_gib == 0:  # no CUDA here: a reasoned fallback
        assert micro == 1 and "no CUDA device" in report.message


def test_help_imports_no_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "bigft", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "torch" not in out.stderr


def test_shipped_4090_qlora_config_picks_a_micro_batch_that_fits() -> None:
    from bigft.plan import get_gpu, make_plan, workload_from_config
    from bigft.plan.batch import total_bytes, usable_bytes

    config = Path(__file__).resolve().parents[2] / "configs" / "llama2-7b-qlora-4090.yaml"
    if not config.exists():
        pytest.skip("configs/llama2-7b-qlora-4090.yaml is not shipped")
    cfg = load_config(config, ["train.micro_batch_size=auto"])
    work = workload_from_config(cfg)
    assert (work.method, work.grad_ckpt, work.optimizer) == ("qlora", True, "paged_adamw_8bit")
    gpu = get_gpu("rtx4090")
    global_batch = cfg.train.global_batch_size
    report = make_plan(work, gpu, global_batch=global_batch)
    largest = report.max_micro_batch
    # The largest micro-batch that fits and divides the global batch (32 on one GPU).
    assert report.fits and report.micro_batch <= largest
    assert global_batch % report.micro_batch == 0
    assert all(global_batch % m for m in range(report.micro_batch + 1, largest + 1))
    capacity = usable_bytes(gpu, 0.05)
    assert total_bytes(work.with_(micro_batch=largest)) <= capacity
    assert total_bytes(work.with_(micro_batch=largest + 1)) > capacity
