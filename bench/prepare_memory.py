"""Where `bigft data prepare` holds memory: anonymous and file-backed resident memory of the
process, sampled from /proc/self/status every 0.2 s and attributed to the phase running.

    python bench/prepare_memory.py CONFIG PREPARED_DIR

Runs `bigft data prepare CONFIG data.num_proc=1 data.prepared_dir=PREPARED_DIR` in this
process (Linux), then prints the peak RssAnon and RssFile of each phase: load, tokenize,
digests (exact-duplicate index), clean, plan (packing plan), write (the store), and
"start" for the rest. Use the configs bench/dataprep.py writes (kept when it is
interrupted) with an empty HF_DATASETS_CACHE. Figures go to bench/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Any


def main() -> None:
    config, store = sys.argv[1:3]
    sys.argv = ["bigft", "data", "prepare", config, "data.num_proc=1"]
    sys.argv.append(f"data.prepared_dir={store}")
    samples: list[tuple[str, int, int]] = []
    phase = ["start"]

    def sample() -> None:
        while True:
            with open("/proc/self/status") as f:
                rss = {line.split(":")[0]: int(line.split()[1]) for line in f if "Rss" in line}
            samples.append((phase[0], rss["RssAnon"] // 1024, rss["RssFile"] // 1024))
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    import bigft.data.pipeline as pipeline
    import bigft.data.prepared as prepared
    from bigft.commands import main as bigft_main

    def during(owner: Any, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            before, phase[0] = phase[0], label
            try:
                return inner(*args, **kwargs)
            finally:
                phase[0] = before

        setattr(owner, name, wrapped)

    during(pipeline, "load_rows", "load")
    during(pipeline._Tokenize, "file", "tokenize")
    during(pipeline, "ExactDuplicates", "digests")
    during(pipeline, "_clean", "clean")
    during(pipeline.PackingPlan, "of", "plan")
    during(prepared, "_write", "write")
    with contextlib.suppress(SystemExit):  # the CLI exits when it is done
        bigft_main()
    peaks: dict[str, tuple[int, int]] = {}
    for name, anon, file in samples:
        a, f = peaks.get(name, (0, 0))
        peaks[name] = (max(a, anon), max(f, file))
    print("| phase | peak anonymous MiB | peak file-backed MiB |\n|---|---|---|")
    for name, (anon, file) in peaks.items():
        print(f"| {name} | {anon} | {file} |")


if __name__ == "__main__":
    main()
