"""Long sequences on one 24 GB card: Llama-3.1-8B QLoRA on an RTX 4090, by the planner.

    python bench/long_context.py [--no-simulate] [--attn sdpa,flash_attention_2]

No weights are downloaded: the planner's architecture preset of Llama-3.1-8B, the 4090
recipe's method (QLoRA r=16 on every linear, paged 8-bit AdamW, full gradient
checkpointing), micro-batch 1, LoRA dropout 0 (as in Unsloth's long-context table; the CPU
simulation keeps dropout masks in fp32 where CUDA keeps bool ones, which would make its
figures pessimistic by 3 bytes per adapter input element). Each figure is analytic
(`bigft plan`) and simulated (the real step under FakeTensorMode, `bigft plan --simulate`):

1. at 4,096 tokens, full logits against the chunked loss: the analytic logits / loss term
   (the largest `logits` component of the forward, loss and lm_head phases: the chunked
   loss computes everything in the head's forward), and the forward-and-loss peak (everything
   up to the top layer's backward), analytic and simulated: the simulator does not label
   the loss's tensors apart from the layers' activations;
2. the longest sequence that fits (`bigft plan --max-seq-len`, in steps of 256 tokens,
   confirmed by `--simulate`): plain (full loss), chunked loss, + activation offload,
   + tiled MLP, for sdpa with packed rows (a dense L x L mask) and flash-attention-2.

Takes ~10 minutes on 2 CPU cores with the simulation. Prints markdown; figures go to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bigft.plan import analytic as analytic_peak
from bigft.plan import get_gpu, load_arch, simulate
from bigft.plan.memory import phase_breakdowns
from bigft.plan.search import max_seq_len
from bigft.plan.workload import Workload

GIB = 1024**3
GB = 1e9
RECIPE = "configs/llama3.1-8b-qlora-4090.yaml"
VARIANTS = (
    ("plain: full loss", {"loss_impl": "full"}, "train.loss_impl=full"),
    ("chunked loss", {}, ""),
    ("+ activation offload", {"offload_activations": True}, "method.offload_activations=true"),
    (
        "+ tiled MLP",
        {"offload_activations": True, "tiled_mlp": True},
        "method.offload_activations=true method.tiled_mlp=true",
    ),
)


def recipe_workload(**changes: object) -> Workload:
    """The 4090 QLoRA recipe's step at micro-batch 1 (what `bigft plan RECIPE` plans)."""
    base = Workload(
        arch=load_arch("llama-3.1-8b"),
        method="qlora",
        lora_rank=16,
        lora_dropout=0.0,
        optimizer="paged_adamw_8bit",
        grad_ckpt=True,
        micro_batch=1,
        seq_len=4096,
    )
    return base.with_(**changes)


def loss_term(impl: str, sim: bool) -> tuple[float, float, float | None]:
    """At 4,096 tokens: the analytic logits / loss term, and the forward-and-loss peak
    (everything up to the top layer's backward), analytic and simulated."""
    work = recipe_workload(loss_impl=impl)
    phases = phase_breakdowns(work)
    head = max(sum(phases[p].values()) for p in ("forward", "loss", "lm_head"))
    simulated = sum(simulate(work).phases["head"].values()) if sim else None
    term = max(phases[p]["logits"] for p in ("forward", "loss", "lm_head"))
    return term, head, simulated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-simulate", action="store_true", help="analytic figures only")
    parser.add_argument("--attn", default="sdpa,flash_attention_2")
    args = parser.parse_args()
    sim = not args.no_simulate
    warnings.simplefilter("ignore")
    gpu = get_gpu("rtx4090")
    print(f"## Llama-3.1-8B QLoRA on {gpu.name} ({gpu.memory_gib:.1f} GiB), micro-batch 1\n")
    print(
        "| loss at 4,096 tokens | logits / loss term, analytic (GB) "
        "| forward + loss peak, analytic (GB) | simulated (GB) |"
    )
    print("|---|---|---|---|")
    for impl in ("full", "chunked"):
        term, head, simulated = loss_term(impl, sim)
        shown = "-" if simulated is None else f"{simulated / GB:.2f}"
        print(f"| {impl} | {term / GB:.2f} | {head / GB:.2f} | {shown} |", flush=True)
    print()
    print(
        "| attention | variant | longest seq, analytic | simulated | peak phase at it "
        "| GPU GiB (analytic) | host GiB | command |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for attn in args.attn.split(","):
        for name, changes, overrides in VARIANTS:
            start = time.perf_counter()
            work = recipe_workload(attn=attn, **changes)
            answer = max_seq_len(work, gpu, simulate=sim)
            at = analytic_peak(work.with_(seq_len=answer.analytic))
            attn_flag = "" if attn == "sdpa" else " --attn flash_attention_2"
            command = (
                f"`bigft plan {RECIPE} --max-seq-len --micro-batch 1{attn_flag}"
                " method.lora.dropout=0"
                f"{' ' + overrides if overrides else ''}{' --simulate' if sim else ''}`"
            )
            simulated = "-" if answer.simulated is None else f"{answer.simulated:,}"
            print(
                f"| {attn} | {name} | {answer.analytic:,} | {simulated} | {at.phase} "
                f"| {at.tensor_peak / GIB:.2f} | {at.cpu_bytes / GIB:.2f} | {command} |",
                flush=True,
            )
            print(f"<!-- {time.perf_counter() - start:.0f} s -->", file=sys.stderr)


if __name__ == "__main__":
    main()
