"""Peak memory and step time of the causal-LM loss: full logits against the chunked loss.

    python bench/chunked_loss.py [--seq 2048] [--batch 1] [--chunks 256,1024]
                                 [--hidden 256] [--layers 2] [--frozen-head]
                                 [--steps 3] [--threads 2]

A Llama made in code with Llama-3's vocabulary (128,256), by default hidden 256 and 2
layers, fp32 on the CPU: the lm_head and the loss are nearly all of the step, the worst
case for any chunked loss (in Llama-3.1-8B they are ~7 % of the matmul work).
`--frozen-head` freezes the embeddings and the lm_head, as LoRA does: the head then
needs no weight gradient, which the chunked loss otherwise accumulates chunk by chunk.
Each variant runs in a fresh process: one forward + backward (`bigft.losses.loss_sum`,
then `backward`) whose peak RSS over the model's resident baseline (`ru_maxrss`,
gradients not yet allocated) is the memory column, then `--steps` more whose median is
the time column. Prints a markdown table; figures go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 128256


def worker(impl: str, chunk: int, args: argparse.Namespace) -> dict:
    """One variant, in this process: peak RSS of the first step, then timed steps."""
    import torch

    from bigft.chunked_loss import prepare_loss
    from bigft.losses import loss_sum
    from bigft.tiny import build_tiny_llama

    torch.set_num_threads(args.threads)
    seq, hidden = args.seq, args.hidden
    intermediate = 256 * round(hidden * 8 / 3 / 256)  # Llama's MLP ratio
    heads = max(hidden // 64, 1)
    model = build_tiny_llama(
        VOCAB,
        hidden_size=hidden,
        num_layers=args.layers,
        num_heads=heads,
        num_kv_heads=max(heads // 2, 1),
        intermediate_size=intermediate,
        max_positions=seq,
    )
    model.train()
    if args.frozen_head:
        model.get_input_embeddings().requires_grad_(False)
        model.get_output_embeddings().requires_grad_(False)
    info = prepare_loss(model, impl, chunk)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (args.batch, seq), generator=generator)
    data = {"input_ids": ids, "labels": ids.clone()}

    def step() -> float:
        start = time.perf_counter()
        loss, _ = loss_sum(model, data)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    first = step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = [step() for _ in range(args.steps)]
    return {
        "info": info,
        "peak_mib": (peak - base) / 1024,  # ru_maxrss is in KiB on Linux
        "first_s": first,
        "median_s": statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunks", default="256,1024", help="loss_chunk values to compare")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--frozen-head", action="store_true", help="freeze embeddings, lm_head")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args)))
        return
    variants = [("full", 0)] + [("chunked", int(c)) for c in args.chunks.split(",")]
    common = [f"--{k}={getattr(args, k)}" for k in ("seq", "batch", "steps", "threads")]
    common += [f"--hidden={args.hidden}", f"--layers={args.layers}"]
    common += ["--frozen-head"] if args.frozen_head else []
    rows = []
    for impl, chunk in variants:
        cmd = [sys.executable, __file__, *common, "--worker", impl, str(max(chunk, 1))]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append((impl, chunk, json.loads(out.strip().splitlines()[-1])))
    full = rows[0][2]
    print(
        f"Llama vocab {VOCAB}, hidden {args.hidden}, {args.layers} layers, fp32, CPU, "
        f"{args.batch} x {args.seq} tokens, {args.threads} threads"
        f"{', embeddings and lm_head frozen' if args.frozen_head else ''}\n"
    )
    print("| loss | peak RSS over baseline (MiB) | vs full | step, median (s) | vs full |")
    print("|---|---|---|---|---|")
    for impl, chunk, r in rows:
        name = f"{impl}, chunk {chunk}" if chunk else impl
        print(
            f"| {name} | {r['peak_mib']:.0f} | {r['peak_mib'] / full['peak_mib']:.2f} "
            f"| {r['median_s']:.2f} | {r['median_s'] / full['median_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
