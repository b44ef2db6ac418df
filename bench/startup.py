"""Start-up time of the command line: `bigft --help`, `bigft --version` and an analytic
`bigft plan` (no torch import), wall clock per command.

    python bench/startup.py [--runs 5] [--json results.json]

Uses hyperfine when it is installed (3 warmup runs, then `--runs`), a Python loop over
subprocesses otherwise; reports the median. Figures go to bench/RESULTS.md.
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

# The console script next to this interpreter, not a version-manager shim in front of it.
BIN = Path(sys.executable).parent
BIGFT = str(BIN / "bigft") if (BIN / "bigft").exists() else "bigft"
COMMANDS = {
    "bigft --help": f"{BIGFT} --help",
    "bigft --version": f"{BIGFT} --version",
    "bigft plan --model llama-3.1-8b --method qlora --gpu rtx4090 --grad-ckpt": f"{BIGFT} plan "
    "--model llama-3.1-8b --method qlora --gpu rtx4090 --grad-ckpt",
    "python -c 'import torch' (for scale)": f"{sys.executable} -c 'import torch'",
}


def with_hyperfine(commands: dict[str, str], runs: int) -> dict[str, list[float]]:
    """Wall times (s) of each command, measured by hyperfine."""
    with tempfile.TemporaryDirectory(prefix="bigft-startup-") as tmp:
        out = Path(tmp) / "hyperfine.json"
        cmd = ["hyperfine", "--warmup", "3", "--runs", str(runs), "--style", "none", "-N"]
        cmd += ["--export-json", str(out), *commands.values()]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        results = json.loads(out.read_text())["results"]
    return {name: r["times"] for name, r in zip(commands, results, strict=True)}


def with_loop(commands: dict[str, str], runs: int) -> dict[str, list[float]]:
    """Wall times (s) of each command, from a subprocess loop (1 warmup run)."""
    times: dict[str, list[float]] = {}
    for name, line in commands.items():
        argv = line.split() if "'" not in line else ["sh", "-c", line]
        subprocess.run(argv, check=True, capture_output=True)
        times[name] = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="Timed runs per command.")
    parser.add_argument("--no-hyperfine", action="store_true", help="Use the Python loop.")
    parser.add_argument("--json", type=Path, help="Also write every time to this file.")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    use_hyperfine = shutil.which("hyperfine") is not None and not args.no_hyperfine
    times = (with_hyperfine if use_hyperfine else with_loop)(COMMANDS, args.runs)
    tool = "hyperfine (-N, 3 warmup runs)" if use_hyperfine else "a subprocess loop"
    print(f"median of {args.runs} runs each, measured with {tool}\n")
    print("| command | median s | min s | max s |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        print(f"| `{name}` | {statistics.median(ts):.3f} | {min(ts):.3f} | {max(ts):.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"commands": COMMANDS, "times": times}, indent=2))


if __name__ == "__main__":
    main()
