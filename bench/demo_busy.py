"""`bigft demo` on a quiet and on a busy CPU: training tokens/s with one compute thread (the
demo's default) against one per core (torch's default, asked for with OMP_NUM_THREADS).

    python bench/demo_busy.py [--steps 200] [--hogs 2]

Each run is `python -m bigft demo --output-dir TMP train.steps=STEPS` in a fresh process;
the figure is the median `tokens_per_s` of its logged steps (metrics.jsonl). "busy" runs
the demo beside HOGS processes that spin on the CPU (as another user's job would). Prints
a markdown table; figures go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def spin() -> None:
    while True:
        pass


def demo_tokens_per_s(steps: int, threads: str | None) -> tuple[float, float]:
    """(median training tokens/s, wall seconds) of one demo run."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    with tempfile.TemporaryDirectory(prefix="bigft-demo-busy-") as tmp:
        out = Path(tmp) / "demo"
        start = time.perf_counter()
        command = [sys.executable, "-m", "bigft", "demo", "--output-dir", str(out)]
        subprocess.run(
            [*command, f"train.steps={steps}", f"eval.every_steps={steps}"],
            env=env,
            check=True,
            capture_output=True,
        )
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # not step 1
    return statistics.median(speeds), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    rows = []
    for load in ("quiet", "busy"):
        hogs = [
            mp.Process(target=spin, daemon=True) for _ in range(args.hogs if load == "busy" else 0)
        ]
        for h in hogs:
            h.start()
        try:
            for label, threads in (
                ("1 (demo default)", None),
                (f"{os.cpu_count()} (OMP_NUM_THREADS)", str(os.cpu_count())),
            ):
                speed, wall = demo_tokens_per_s(args.steps, threads)
                rows.append((load, label, speed, wall))
                print(
                    f"{load} threads {label}: {speed:,.0f} tokens/s, {wall:.1f} s", file=sys.stderr
                )
        finally:
            for h in hogs:
                h.terminate()
    command = f"python bench/demo_busy.py --steps {args.steps} --hogs {args.hogs}"
    print(f"`{command}`, {os.cpu_count()} cores\n")
    print("| machine | compute threads | training tokens/s (median) | demo wall s |")
    print("|---|---|---|---|")
    for load, label, speed, wall in rows:
        print(f"| {load} | {label} | {speed:,.0f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
