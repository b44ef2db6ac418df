"""Data preparation speed: tokenize, clean and pack synthetic alpaca rows through bigft's
pipeline (`bigft.data.prepare_data`, then `pack`), with data.num_proc 1 and 2, each cold
(empty datasets cache) and then again with the cache of the first run.

    python bench/dataprep.py [--rows 30000] [--repeats 3] [--json results.json]

Every measurement runs in a fresh process with one thread and its own temporary
HF_DATASETS_CACHE, so nothing is reused that a user's second run would not reuse. Prints
a markdown table; figures go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULT_PREFIX = "RESULT "
SEQ_LEN = 512


def prepare_inputs(root: Path, rows: int) -> None:
    """The word-level tokenizer and the alpaca rows of bench/throughput.py, `rows` of them."""
    from throughput import SPECIALS, TEMPLATE_WORDS, alpaca_rows, build_tokenizer, make_words

    words = make_words(8192 - len(SPECIALS) - len(TEMPLATE_WORDS), seed=0)
    build_tokenizer(words).save_pretrained(root / "tokenizer")
    data = alpaca_rows(rows, words, SEQ_LEN, seed=0)
    (root / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))


def worker(root: Path, cache: Path, num_proc: int) -> None:
    """One prepare_data + pack, timed phase by phase; prints one RESULT line."""
    import torch

    torch.set_num_threads(1)
    import datasets
    from transformers import AutoTokenizer

    from bigft.config import DataConfig, SplitConfig
    from bigft.data import pack, prepare_data

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    cfg = DataConfig(
        format="alpaca",
        train=str(root / "alpaca.jsonl"),
        prompt_template="short",
        split=SplitConfig(train=1.0, validation=0.0),
        num_proc=num_proc,
        cache=True,
    )
    start = time.perf_counter()
    prepared = prepare_data(cfg, tokenizer, SEQ_LEN, seed=0)
    prepared_at = time.perf_counter()
    packed = pack(prepared.train, SEQ_LEN, seed=0, pad_token_id=tokenizer.pad_token_id)
    end = time.perf_counter()
    stats = prepared.stats.splits["train"]
    result = {
        "rows": stats.rows_loaded,
        "rows_kept": stats.rows_kept,
        "tokens": stats.tokens,
        "packed_rows": len(packed),
        "prepare_s": prepared_at - start,
        "pack_s": end - prepared_at,
        "total_s": end - start,
        "cache_files": sum(1 for _ in cache.rglob("*.arrow")),
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def launch(root: Path, cache: Path, num_proc: int) -> dict[str, Any]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_DATASETS_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [sys.executable, __file__, "--worker", "--root", str(root), "--cache", str(cache)]
    cmd += ["--num-proc", str(num_proc)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix(RESULT_PREFIX))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=30000, help="Synthetic alpaca rows.")
    parser.add_argument("--repeats", type=int, default=3, help="Cold + cached pairs per setting.")
    parser.add_argument("--json", type=Path, help="Also write every figure to this file.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--num-proc", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.root, args.cache, args.num_proc)
        return

    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="bigft-dataprep-"))
    try:
        prepare_inputs(root, args.rows)
        results: list[dict[str, Any]] = []
        for repeat in range(args.repeats):
            for num_proc in (1, 2):
                cache = root / f"cache-{num_proc}-{repeat}"
                for state in ("cold", "cached"):
                    result = launch(root, cache, num_proc)
                    result.update(num_proc=num_proc, state=state, repeat=repeat)
                    results.append(result)
                    print(
                        f"repeat {repeat} num_proc {num_proc} {state}: {result['total_s']:.2f} s",
                        file=sys.stderr,
                        flush=True,
                    )

        size_mib = (root / "alpaca.jsonl").stat().st_size / 2**20
        first = results[0]
        print(
            f"{first['rows']} synthetic alpaca rows ({size_mib:.1f} MiB of JSON Lines, "
            f"{first['tokens']:,} tokens, word-level tokenizer of 8192 tokens), seq_len {SEQ_LEN}, "
            f"packed into {first['packed_rows']} rows; median of {args.repeats}; 1 thread per "
            "process\n"
        )
        print(
            "| num_proc | datasets cache | prepare_data s | pack s | total s | rows/s "
            "| vs cold num_proc 1 |"
        )
        print("|---|---|---|---|---|---|---|")
        medians: dict[tuple[int, str], dict[str, float]] = {}
        for num_proc in (1, 2):
            for state in ("cold", "cached"):
                mine = [r for r in results if r["num_proc"] == num_proc and r["state"] == state]
                medians[num_proc, state] = {
                    k: statistics.median(r[k] for r in mine)
                    for k in ("prepare_s", "pack_s", "total_s")
                }
        base = medians[1, "cold"]["total_s"]
        for (num_proc, state), m in medians.items():
            print(
                f"| {num_proc} | {state} | {m['prepare_s']:.2f} | {m['pack_s']:.2f} "
                f"| {m['total_s']:.2f} | {first['rows'] / m['total_s']:,.0f} "
                f"| {base / m['total_s']:.2f}x |"
            )
        print(f"\n_total bench time: {time.perf_counter() - start:.0f} s_")
        if args.json:
            summary = {f"num_proc={n} {s}": m for (n, s), m in medians.items()}
            args.json.write_text(json.dumps({"summary": summary, "results": results}, indent=2))

    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
