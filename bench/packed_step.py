"""Forward + backward cost of one packed batch, taken apart: bigft's loss, the model's own
loss, the batch flattened into one row (TRL's padding-free layout) and TRL's fused LM head.

    python bench/packed_step.py [--repeats 5]

Same model and data as bench/throughput.py; one process, one thread, CPU seconds of each
variant interleaved, median after one warmup. Explains the bigft / TRL gap in that
benchmark; figures go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="Timed runs per variant.")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    torch.set_num_threads(1)
    from throughput import Setting, _load_model, prepare_inputs
    from trl.trainer.utils import add_fused_lm_head

    from bigft.data.packing import pack
    from bigft.losses import loss_sum

    s = Setting()
    with tempfile.TemporaryDirectory(prefix="bigft-packed-step-") as tmp:
        root = Path(tmp)
        tokenized = prepare_inputs(root, s)["tokenized"]
        model = _load_model(root).train()
    packed = pack(tokenized, s.seq_len, seed=0)[: s.packed_micro_batch]
    batch = {
        k: torch.tensor(packed[k], dtype=torch.long)
        for k in ("input_ids", "labels", "position_ids")
    }
    flat = {k: v.reshape(1, -1) for k, v in batch.items()}
    # As SFTTrainer adds it (its logged entropy and accuracy come from the head); the
    # original forward stays the default.
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    targets = int((batch["labels"][:, 1:] != -100).sum())

    def bigft_loss() -> None:
        summed, _ = loss_sum(model, batch)
        (summed / targets).backward()

    variants: dict[str, Callable[[], None]] = {
        f"bigft loss, {s.packed_micro_batch} x {s.seq_len}": bigft_loss,
        "model's own loss, same rows": lambda: model(**batch, use_cache=False).loss.backward(),
        "model's own loss, flattened to 1 row": lambda: model(
            **flat, use_cache=False
        ).loss.backward(),
        "TRL fused LM head, same rows": lambda: model(**batch, fused_lm_head=True).loss.backward(),
        "TRL fused LM head, flattened (TRL packed)": lambda: model(
            **flat, fused_lm_head=True
        ).loss.backward(),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats + 1):
        for name, run in variants.items():
            model.zero_grad(set_to_none=True)
            start = time.process_time()
            run()
            times[name].append(time.process_time() - start)
    base = statistics.median(next(iter(times.values()))[1:])
    print(f"forward + backward of one packed batch, CPU s, median of {args.repeats}\n")
    print("| variant | CPU s | vs bigft |")
    print("|---|---|---|")
    for name, ts in times.items():
        median = statistics.median(ts[1:])
        print(f"| {name} | {median:.3f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
