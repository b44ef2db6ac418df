"""Peak host RAM per rank while loading and training a ~125M-parameter Llama on 2 CPU
processes: DDP (every rank holds the whole model, gradients and Adam states) against
ZeRO-3 (parameters initialized partitioned through zero.Init, states sharded) and FSDP2.

    python bench/host_ram.py [--steps 2]

Prints one line per strategy and the ZeRO-3 / DDP ratio; figures go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import alpaca_rows, write_config, write_jsonl


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--strategies", default="ddp,zero3,fsdp2")
    args = parser.parse_args()
    from bigft.tiny import save_tiny_base

    root = Path(tempfile.mkdtemp(prefix="bigft-host-ram-"))
    base = save_tiny_base(
        root / "base",
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=12,
        intermediate_size=3072,
    )
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), "pt") as fh:
        params = sum(_numel(fh.get_slice(k).get_shape()) for k in fh.keys())  # noqa: SIM118
    data = write_jsonl(root / "train.jsonl", alpaca_rows(64))
    cfg = write_config(root / "cfg.yaml", base, data, train={"steps": args.steps, "seq_len": 64})
    results = {}
    for strategy in args.strategies.split(","):
        out = root / strategy
        cmd = [
            sys.executable,
            "-m",
            "bigft",
            "launch",
            str(cfg),
            "--nproc",
            "2",
            f"parallel.strategy={strategy}",
            f"output_dir={out}",
            "checkpoint.export=false",
            "eval.every_steps=null",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        summary = json.loads((out / "summary.json").read_text())
        results[strategy] = summary["peak_rss_mib_per_rank"]
        print(f"{strategy:6s} peak RSS per rank (MiB): {results[strategy]}", flush=True)
    print(f"model: {params / 1e6:.1f}M parameters, fp32 ({params * 4 / 2**20:.0f} MiB of weights)")
    if "ddp" in results:
        for name, rss in results.items():
            print(f"{name} / ddp: {max(rss) / max(results['ddp']):.2f}")


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
