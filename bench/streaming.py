"""Streaming a corpus far larger than the memory the training process uses.

    python bench/streaming.py [--gib 15] [--limit-gib 1.5] [--steps 300] [--workers 0]

Writes a text corpus of --gib GiB (16 JSONL shards of random words), then runs
`bigft train` on it with data.streaming (the tiny Llama on CPU, seq_len 512, micro-batch
4, packed) in a memory cgroup limited to --limit-gib (memory.limit_in_bytes and
memory.memsw.limit_in_bytes of cgroup v1, as root; page cache counts against it too, so
reading the corpus through the page cache must not grow the group). Without a writable
memory cgroup the run is unlimited and says so. The default corpus is 10x the limit.
Measures the time from the process start to the first logged step, and the resident
memory of the training process (and its loader workers) every 0.2 s. Flat means the RSS
after the last step is within 10% of the RSS at the first step.

Prints a markdown table and JSON; figures go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bigft.tiny import save_tiny_base

WORDS = [
    *[
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "was",
        "for",
        "on",
        "that",
        "with",
        "as",
        "by",
        "at",
        "from",
        "his",
        "her",
        "an",
        "were",
        "are",
        "which",
    ],
    *[
        "this",
        "be",
        "or",
        "has",
        "had",
        "not",
        "first",
        "one",
        "their",
        "its",
        "new",
        "after",
        "who",
        "they",
        "have",
        "two",
        "been",
        "other",
    ],
    *[
        "also",
        "into",
        "more",
        "only",
        "years",
        "time",
        "when",
        "over",
        "many",
        "most",
        "three",
        "some",
        "would",
        "can",
        "where",
        "all",
    ],
]


def write_corpus(folder: Path, gib: float, shards: int = 16) -> int:
    """Random-word text rows until the folder holds `gib` GiB; its size in bytes."""
    rng = random.Random(0)
    lines = [
        json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(20, 200)))}) + "\n"
        for _ in range(20_000)
    ]
    block = "".join(lines).encode()
    target = int(gib * 2**30)
    per_shard = target // shards
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        with (folder / f"part-{k:03d}.jsonl").open("wb") as f:
            written = 0
            while written < per_shard:
                f.write(block)
                written += len(block)
    return sum(p.stat().st_size for p in folder.iterdir())


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


CGROUPS = Path("/sys/fs/cgroup/memory")


def memory_cgroup(limit: int) -> Path | None:
    """A cgroup v1 memory group limited to `limit` bytes (RAM and RAM + swap), or None."""
    group = CGROUPS / f"bigft-bench-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
        memsw = group / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            memsw.write_text(str(limit))
    except OSError:
        with contextlib.suppress(OSError):
            group.rmdir()
        return None
    return group


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=15.0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument(
        "--limit-gib", type=float, default=1.5, help="RLIMIT_DATA of the training process"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus_bytes = write_corpus(root / "corpus", args.gib)
        model = save_tiny_base(root / "model")
        out = root / "run"
        config = {
            "model": {"name_or_path": str(model)},
            "data": {
                "format": "text",
                "train": str(root / "corpus"),
                "streaming": True,
                "cache": False,
                "loader_workers": args.workers,
            },
            "train": {
                "seq_len": 512,
                "micro_batch_size": 4,
                "steps": args.steps,
                "precision": "fp32",
                "seed": 0,
            },
            "checkpoint": {"every_steps": None, "export": False},
            "logging": {"progress_bar": False},
            "output_dir": str(out),
        }
        (root / "cfg.yaml").write_text(yaml.safe_dump(config))
        limit = int(args.limit_gib * 2**30)
        group = memory_cgroup(limit)
        if group is None:
            print("no writable memory cgroup: the run is not limited", file=sys.stderr)
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "bigft", "train", str(root / "cfg.yaml")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=(
                (lambda: (group / "cgroup.procs").write_text(str(os.getpid())))  # type: ignore[operator]
                if group
                else None
            ),
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        watched = psutil.Process(proc.pid)
        samples: list[tuple[float, int, int]] = []  # (seconds, steps logged, rss)
        first_step = None
        metrics = out / "metrics.jsonl"
        while proc.poll() is None:
            steps = metrics.read_text().count('"loss"') if metrics.is_file() else 0
            now = time.perf_counter() - start
            if steps and first_step is None:
                first_step = now
            samples.append((now, steps, tree_rss(watched)))
            time.sleep(0.2)
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        group_peak = None
        if group is not None:
            group_peak = int((group / "memory.max_usage_in_bytes").read_text())
            failures = int((group / "memory.failcnt").read_text())
            group.rmdir()
        if proc.returncode != 0:
            sys.exit(f"bigft train failed ({proc.returncode}):\n{stderr[-3000:]}")

    stepping = [s for s in samples if s[1] >= 1]
    rss_first, rss_last = stepping[0][2], stepping[-1][2]
    peak = max(s[2] for s in samples)
    result = {
        "corpus_gib": corpus_bytes / 2**30,
        "memory_limit_gib": limit / 2**30 if group is not None else None,
        "cgroup_peak_mib": group_peak / 2**20 if group_peak is not None else None,
        "cgroup_limit_hits": failures if group is not None else None,
        "steps": args.steps,
        "workers": args.workers,
        "first_step_s": first_step,
        "total_s": samples[-1][0],
        "rss_at_first_step_mib": rss_first / 2**20,
        "rss_at_last_sample_mib": rss_last / 2**20,
        "peak_rss_mib": peak / 2**20,
        "corpus_over_peak_rss": corpus_bytes / peak,
        "flat": abs(rss_last - rss_first) <= 0.1 * rss_first,
    }
    limited = f"{args.limit_gib:.1f} GiB" if group is not None else "none"
    print("| corpus | memory limit | first step | RSS at step 1 | RSS at the end | peak RSS |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {result['corpus_gib']:.1f} GiB | {limited} | "
        f"{first_step:.1f} s | {result['rss_at_first_step_mib']:.0f} MiB | "
        f"{result['rss_at_last_sample_mib']:.0f} MiB | {result['peak_rss_mib']:.0f} MiB |"
    )
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
