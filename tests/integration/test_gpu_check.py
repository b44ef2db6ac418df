"""bench/gpu_check.py --tiny: every GPU check runs end to end on the CPU and reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"
SECTIONS = ("packed_isolation", "planner_memory", "throughput", "fsdp2_reduce_dtype")


@pytest.mark.slow
def test_tiny_gpu_check_runs_every_check_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "tiny.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(SCRIPT), "--tiny", "--out", str(out)]
    command += ["--workdir", str(tmp_path / "work")]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, log
    report = json.loads(out.read_text())
    for section in SECTIONS:
        assert section in report, section
    assert report["failed"] == []
    assert report["settings"]["tiny"] is True

    # 1. packed rows stay isolated on the sdpa path and the flattened path (fp32: < 1e-4),
    # and flash's control flow leaks across sequences without the flattening.
    entries = report["packed_isolation"]["entries"]
    for name in ("sdpa, [2, L] rows", "sdpa, [1, 2L] flattened", "flash probe, [1, 2L] flattened"):
        assert entries[name]["status"] == "ok", name
        assert entries[name]["max_abs_diff"] < 1e-4, (name, entries[name])
        assert entries[name]["sequences"] >= 3, name
    assert entries["sdpa, [2, L] rows"]["shape"] == [2, 64]
    assert entries["sdpa, [1, 2L] flattened"]["shape"] == [1, 128]
    assert entries["flash probe, [2, L] rows (unflattened)"]["bug_reproduced"] is True
    assert entries["flash_attention_2"]["reason"] == "skipped: no CUDA device"

    # 2 + 3. each method trained through bigft's loop; the planner predicted its peak.
    for method in ("lora", "qlora", "full"):
        memory = report["planner_memory"][method]
        assert memory["status"] == "ok", memory
        assert memory["predicted_tensor_peak_bytes"] > 0
        assert memory["predicted_total_bytes"] > memory["predicted_tensor_peak_bytes"]
        assert memory["micro_batch"] == 2  # the run's micro-batch, not the planner's pick
        assert memory["measured_allocated_bytes"] is None  # no CUDA
        throughput = report["throughput"][method]
        assert throughput["status"] == "ok", throughput
        assert throughput["tokens_per_s"] > 0
        assert throughput["steps"] == 2 and throughput["tokens"] > 0
        assert throughput["mfu"] is None  # no GPU peak to divide by
    params = {m: report["planner_memory"][m]["parameters"] for m in ("lora", "qlora", "full")}
    assert params["full"]["trainable"] == params["full"]["total"]
    for method in ("lora", "qlora"):  # adapters on a frozen base
        assert 0 < params[method]["trainable"] < params[method]["total"], method

    # 4. one-process FSDP2 through bigft: gradients reduced and kept in float32.
    fsdp = report["fsdp2_reduce_dtype"]
    assert fsdp["status"] == "ok", fsdp
    assert fsdp["distributed_type"] == "FSDP"
    assert fsdp["engine_report_param_dtype"] == "bfloat16"
    assert fsdp["engine_report_reduce_dtype"] == "float32"
    assert fsdp["group_reduce_dtypes"] == ["float32"]
    assert fsdp["sharded_grad_dtypes"] == ["float32"] and fsdp["sharded_grads_are_dtensors"]

    # 5. the recipe under each memory / speed option trained, with the loss it asked for.
    options = report["options"]
    assert options["status"] == "ok", options
    entries = options["entries"]
    assert list(entries) == [
        "full logits",
        "chunked loss",
        "chunked + offload",
        "chunked + tiled MLP",
        "chunked + compile",
    ]
    for name, entry in entries.items():
        assert entry["status"] == "ok", (name, entry)
        assert entry["tokens_per_s"] > 0 and entry["measured_allocated_bytes"] is None
        assert entry["loss_impl"] == ("full" if name == "full logits" else "chunked"), name
    full, chunked = (
        entries[n]["predicted_tensor_peak_bytes"] for n in ("full logits", "chunked loss")
    )
    assert chunked <= full  # the character vocabulary's logits are small: close to equal

    # The summary table and the command that reproduces the run.
    assert "fsdp2 reduce dtype" in proc.stdout
    assert f"reproduce: python bench/gpu_check.py --tiny --out {out}" in proc.stdout
    assert report["command"].startswith("python bench/gpu_check.py --tiny")
