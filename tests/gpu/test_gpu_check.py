"""bench/gpu_check.py on a real GPU: every check passes (needs CUDA)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


def test_gpu_check_passes(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--workdir", str(tmp_path / "w")]
    proc = subprocess.run(
        command, env=dict(os.environ), capture_output=True, text=True, timeout=900
    )
    assert out.is_file(), proc.stdout[-6000:] + proc.stderr[-6000:]
    report = json.loads(out.read_text())
    assert report["failed"] == [], proc.stdout[-6000:]
    assert proc.returncode == 0

    entries = report["packed_isolation"]["entries"]
    if importlib.util.find_spec("flash_attn") is not None:
        flat = entries["flash_attention_2, [1, 2L] flattened"]
        assert flat["shape"][0] == 1 and flat["isolated"]
        assert entries["flash_attention_2, [2, L] rows (unflattened)"]["bug_reproduced"]
    else:
        assert entries["flash_attention_2"]["reason"] == "skipped: flash-attn not installed"
    for method in ("lora", "qlora", "full"):
        memory = report["planner_memory"][method]
        if memory["status"] == "skipped":  # QLoRA without bitsandbytes
            continue
        assert abs(memory["ratio"] - 1) <= 0.10, memory
        assert report["throughput"][method]["tokens_per_s"] > 0
    fsdp = report["fsdp2_reduce_dtype"]
    assert fsdp["group_reduce_dtypes"] == ["float32"]
    assert fsdp["sharded_grad_dtypes"] == ["float32"]
