"""Peak host RAM per rank on 2 CPU processes, while loading and while training: DDP (every
rank holds the whole model, gradients and Adam states) against ZeRO-3 (parameters
initialized partitioned through zero.Init) and FSDP2 (rank 0 reads the weights, the other
ranks receive their shards; `fsdp2-every-rank` turns that off for comparison).

    python bench/host_ram.py [--size 113m|450m|1b] [--steps 2] [--load-only]
                             [--strategies ddp,zero3,fsdp2,fsdp2-every-rank]
                             [--set parallel.reduce_bucket_size=50000000 ...]

Each run is `bigft.loop.setup.setup` (accelerator, data, model, `accelerator.prepare`) and then,
unless --load-only, `train`; `ru_maxrss` of every rank is read after setup ("load") and
after training ("train"). The checkpoint is saved in bf16, as published checkpoints are,
and trained in fp32 (bigft's default), so every rank that reads it makes an fp32 copy.
Prints one line per strategy; figures go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import alpaca_rows, write_config, write_jsonl

# Llama shapes (vocab stays the char tokenizer's 100 tokens)
SIZES = {
    "113m": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072},
    "450m": {"hidden_size": 1536, "num_layers": 16, "num_heads": 12, "intermediate_size": 4096},
    "1b": {"hidden_size": 2048, "num_layers": 16, "num_heads": 16, "intermediate_size": 5632},
}
STRATEGIES = {
    "ddp": ["parallel.strategy=ddp"],
    "zero3": ["parallel.strategy=zero3"],
    "fsdp2": ["parallel.strategy=fsdp2"],
    "fsdp2-every-rank": [
        "parallel.strategy=fsdp2",
        "parallel.fsdp_cpu_ram_efficient_loading=false",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="113m")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--load-only", action="store_true", help="stop after setup")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]), args.overrides, args.load_only)
        return

    root = Path(tempfile.mkdtemp(prefix="bigft-host-ram-"))
    base, params = make_base(root / "base", args.size)
    print(
        f"model: {params / 1e6:.1f}M parameters, bf16 checkpoint, trained in fp32 "
        f"({params * 4 / 2**20:.0f} MiB of fp32 weights)",
        flush=True,
    )
    data = write_jsonl(root / "train.jsonl", alpaca_rows(64))
    cfg = write_config(root / "cfg.yaml", base, data, train={"steps": args.steps, "seq_len": 64})
    results = {}
    for name in args.strategies.split(","):
        out = root / name
        overrides = [*STRATEGIES[name], *args.set, f"output_dir={out}", "checkpoint.export=false"]
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            __file__,
            "--worker",
            str(cfg),
            str(out / "host_ram.json"),
            *(["--load-only"] if args.load_only else []),
            *overrides,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads((out / "host_ram.json").read_text())
        line = f"{name:17s} load {results[name]['load']}"
        if "train" in results[name]:
            line += f"  train {results[name]['train']}"
        print(f"{line}  MiB per rank ({time.perf_counter() - start:.0f} s)", flush=True)
    if "ddp" in results:
        for phase in ("load", "train"):
            ddp = results["ddp"].get(phase)
            if ddp:
                ratios = {n: round(max(r[phase]) / max(ddp), 2) for n, r in results.items()}
                print(f"{phase} peak / ddp: {ratios}")


def make_base(out: Path, size: str) -> tuple[Path, int]:
    """A Llama of the given size saved in bf16; returns its directory and parameter count."""
    import torch

    from bigft.tiny import build_char_tokenizer, build_tiny_llama

    tokenizer = build_char_tokenizer()
    shape = SIZES[size]
    model = build_tiny_llama(vocab_size=len(tokenizer), num_kv_heads=shape["num_heads"], **shape)
    params = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, params


def worker(cfg_path: Path, out: Path, overrides: list[str], load_only: bool) -> None:
    """One rank: setup (and train); rank 0 writes every rank's peak RSS."""
    from bigft.config_io import load_config
    from bigft.engine.facts import peak_rss_mib_per_rank
    from bigft.loop.setup import setup
    from bigft.loop.train import train

    run = setup(load_config(cfg_path, overrides))
    result = {"load": peak_rss_mib_per_rank(run.accelerator)}
    if not load_only:
        train(run)
        result["train"] = peak_rss_mib_per_rank(run.accelerator)
    if run.accelerator.is_main_process:
        out.write_text(json.dumps(result))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    main()
