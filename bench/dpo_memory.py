"""Host memory of a DPO step against an SFT step on the same model: does LoRA DPO hold one
copy of the base? (The reference is the base with the adapters disabled.)

    python bench/dpo_memory.py [--hidden 768 --layers 12]

Each case runs in its own process (`bigft.loop.setup` + 6 training steps of 4 rows /
pairs of 64 tokens, fp32, one thread): the resident memory after setup and its peak
during the steps (/proc/self/status VmRSS, sampled every 5 ms). Cases: SFT with LoRA, DPO
with LoRA (no reference copy), SFT full, DPO full (a frozen reference copy) and DPO full
with preference.precompute_reference (the reference scored in setup, no copy).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CASES = ("sft-lora", "dpo-lora", "sft-full", "dpo-full", "dpo-precomputed")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(config: str) -> None:
    from bigft.config_io import load_config
    from bigft.loop.setup import setup
    from bigft.loop.train import train

    run = setup(load_config(config))
    after_setup = rss_mib()
    peak = [after_setup]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    train(run)
    done.set()
    sampler.join()
    reference = run.teacher
    print(
        json.dumps(
            {"setup_mib": after_setup, "peak_mib": peak[0], "reference": type(reference).__name__}
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--worker")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    import yaml

    from bigft.tiny import save_tiny_base

    work = Path(tempfile.mkdtemp(prefix="bigft-dpo-memory-"))
    base = save_tiny_base(
        work / "base",
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=12,
        num_kv_heads=4,
    )
    words = ["".join("abcdefgh"[(i * 7 + j * 3) % 8] for j in range(6)) for i in range(64)]
    prompt = "upper " + " ".join(words[:4]) + " ="
    rows_sft, rows_pref = [], []
    for i in range(64):
        ws = " ".join(words[(i + k) % 64] for k in range(4))
        good = ws.upper()
        bad = good[:3] + ws[3] + good[4:]
        rows_sft.append({"text": f"upper {ws} = {good}"})
        rows_pref.append({"prompt": f"upper {ws} =", "chosen": " " + good, "rejected": " " + bad})
    del prompt
    (work / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_sft))
    (work / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_pref))
    print(f"model: hidden {args.hidden}, {args.layers} layers; fp32")
    print("| case | reference | RSS after setup MiB | peak during steps MiB | step peak - setup |")
    print("|---|---|---|---|---|")
    for case in CASES:
        task, method = case.split("-")
        config = {
            "task": "preference" if task == "dpo" else "causal_lm",
            "model": {"name_or_path": str(base), "dtype": "float32"},
            "data": {
                "format": "text",
                "train": str(work / ("pref.jsonl" if task == "dpo" else "sft.jsonl")),
                "split": {"train": 1.0, "validation": 0.0, "test": 0.0},
                "packing": False,
            },
            "method": {"name": "full"}
            if method in ("full", "precomputed")
            else {"name": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
            # SFT sees 8 sequences a step, like DPO's 4 pairs (chosen + rejected).
            "train": {
                "micro_batch_size": 4 if task == "dpo" else 8,
                "steps": 6,
                "seq_len": 64,
                "precision": "fp32",
                "log_every": 6,
            },
            "checkpoint": {"export": False},
            **({"preference": {"precompute_reference": True}} if method == "precomputed" else {}),
            "logging": {"progress_bar": False},
            "output_dir": str(work / "runs" / case),
        }
        path = work / f"{case}.yaml"
        path.write_text(yaml.safe_dump(config))
        out = (
            subprocess.run(
                [sys.executable, __file__, "--worker", str(path)],
                capture_output=True,
                text=True,
                check=True,
                env={"OMP_NUM_THREADS": "1", **__import__("os").environ},
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        facts = json.loads(out)
        step = facts["peak_mib"] - facts["setup_mib"]
        print(
            f"| {case} | {facts['reference']} | {facts['setup_mib']:,.0f} | "
            f"{facts['peak_mib']:,.0f} | {step:,.0f} |"
        )


if __name__ == "__main__":
    main()
