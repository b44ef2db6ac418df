"""How close the memory planner's estimates are: analytic vs simulated vs measured.

    OMP_NUM_THREADS=1 python bench/planner_accuracy.py            # full run (~10 min, 1 core)
    OMP_NUM_THREADS=1 python bench/planner_accuracy.py --quick    # a subset (~1 min)

Prints markdown sections (pasted into bench/RESULTS.md):
1. ZeRO paper Figure 1 (Ψ = 7.5B, 64 GPUs) from `zero_model_states`.
2. Analytic vs simulated (FakeTensorMode + MemTracker, 2-3 layers extrapolated) per-GPU
   tensor peak for Llama-2-7B and Llama-3.1-8B: seq 2048/4096, micro-batch 1-4,
   checkpointing on/off, full and LoRA.
3. Extrapolated vs full-depth simulation at 7B/8B, and the simulation's wall time.
4. Analytic and simulated vs measured: the same step on real CPU tensors (real init, real
   peft, MemTracker) for small real Llama models, across methods, lengths and batches.
5. QLoRA 7B at seq 512, batch 1, checkpointing: 4-bit base and total vs a 24 GB card.
6. Time of an analytic plan (all layouts, micro-batch search) for every shipped model.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bigft.plan import analytic, get_gpu, load_arch, make_plan, shipped_archs, simulate
from bigft.plan.arch import arch_from_config
from bigft.plan.memory import zero_model_states
from bigft.plan.simulate import simulate_depth
from bigft.plan.workload import Workload

GIB = 1024**3
# Small real Llama models (no download: random init from these configs).
SMALL = {
    "llama-19m": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32000,
    ),
    "llama-50m": dict(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
}


def pct(estimate: float, truth: float) -> float:
    return (estimate - truth) / truth * 100


def zero_figure() -> None:
    print("## 1. ZeRO Figure 1 (Ψ = 7.5B, N_d = 64, K = 12)\n")
    print("| stage | paper GB | bigft GB |\n|---|---|---|")
    for stage, paper in enumerate((120, 31.4, 16.6, 1.9)):
        print(f"| {stage} | {paper} | {zero_model_states(7.5e9, 64, stage) / 1e9:.2f} |")
    print()


def analytic_vs_simulated(quick: bool) -> None:
    print("## 2. Analytic vs simulated per-GPU tensor peak (one GPU, bf16 autocast)\n")
    print("| model | method | seq | mb | ckpt | simulated GiB | analytic GiB | error | sim s |")
    print("|---|---|---|---|---|---|---|---|---|")
    errors = []
    models = ("llama-2-7b", "llama-3.1-8b")
    grid = itertools.product(models, ("full", "lora"), (2048, 4096), (1, 2, 3, 4), (False, True))
    for name, method, seq, mb, ckpt in grid:
        if quick and (mb in (2, 3) or (seq == 4096 and method == "full")):
            continue
        work = Workload(
            arch=load_arch(name), method=method, seq_len=seq, micro_batch=mb, grad_ckpt=ckpt
        )
        sim = simulate(work)
        est = analytic(work).tensor_peak
        errors.append(abs(pct(est, sim.total)))
        print(
            f"| {name} | {method} | {seq} | {mb} | {'on' if ckpt else 'off'} | "
            f"{sim.total / GIB:.2f} | {est / GIB:.2f} | {pct(est, sim.total):+.2f}% | "
            f"{sim.seconds:.1f} |"
        )
    print(
        f"\n{len(errors)} cases: mean |error| {statistics.mean(errors):.2f}%, "
        f"max {max(errors):.2f}%\n"
    )


def extrapolation() -> None:
    print("## 3. Extrapolated (2-3 layers) vs full-depth simulation\n")
    print(
        "| model | method | seq | mb | ckpt | full depth GiB | extrapolated GiB | diff | "
        "full s | extrapolated s |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    for name, method, ckpt in (("llama-2-7b", "full", False), ("llama-3.1-8b", "lora", True)):
        work = Workload(
            arch=load_arch(name), method=method, seq_len=4096, micro_batch=2, grad_ckpt=ckpt
        )
        full, quick = simulate(work, full_depth=True), simulate(work)
        print(
            f"| {name} | {method} | 4096 | 2 | {'on' if ckpt else 'off'} | "
            f"{full.total / GIB:.3f} | {quick.total / GIB:.3f} | "
            f"{pct(quick.total, full.total):+.3f}% | {full.seconds:.1f} | {quick.seconds:.1f} |"
        )
    print()


def measured(quick: bool) -> None:
    print("## 4. Analytic and simulated vs measured (real CPU tensors, MemTracker)\n")
    print(
        "| model | params | method | precision | seq | mb | ckpt | measured MiB | simulated "
        "| analytic |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    cases = [
        ("full", "fp32", {}),
        ("full", "bf16", {}),
        ("freeze", "bf16", {"trainable_layers": 2}),
        ("lora", "bf16", {}),
        ("lora", "bf16", {"weight_dtype": "bf16", "lora_dropout": 0.05}),
        ("dora", "bf16", {"weight_dtype": "bf16"}),
        ("qlora", "bf16", {"lora_dropout": 0.05}),
    ]
    sim_err, an_err = [], []
    for model, (method, precision, extra), seq, mb, ckpt in itertools.product(
        SMALL, cases, (128, 512), (1, 4), (False, True)
    ):
        if quick and (model != "llama-19m" or seq == 512 or mb == 4):
            continue
        arch = arch_from_config({"model_type": "llama", **SMALL[model]}, name=model)
        work = Workload(
            arch=arch,
            method=method,
            precision=precision,
            seq_len=seq,
            micro_batch=mb,
            grad_ckpt=ckpt,
            device="cpu",
            **extra,
        )
        phases = simulate_depth(
            work, work.n_trainable_layers, arch.layers - work.n_trainable_layers, fake=False
        )
        real = max(sum(p.values()) for p in phases.values())
        sim = simulate(work).total
        est = analytic(work).tensor_peak
        sim_err.append(abs(pct(sim, real)))
        an_err.append(abs(pct(est, real)))
        label = method + (" (bf16 base)" if "weight_dtype" in extra else "")
        label += " +dropout" if "lora_dropout" in extra else ""
        print(
            f"| {model} | {arch.n_params / 1e6:.0f}M | {label} | {precision} | {seq} | {mb} | "
            f"{'on' if ckpt else 'off'} | {real / 2**20:.1f} | {pct(sim, real):+.2f}% | "
            f"{pct(est, real):+.2f}% |"
        )
    print(
        f"\n{len(an_err)} cases: simulated mean |error| {statistics.mean(sim_err):.2f}% "
        f"(max {max(sim_err):.2f}%), analytic mean {statistics.mean(an_err):.2f}% "
        f"(max {max(an_err):.2f}%)\n"
    )


def qlora_7b() -> None:
    print("## 5. QLoRA Llama-2-7B, seq 512, batch 1, checkpointing, RTX 4090\n")
    work = Workload(
        arch=load_arch("llama-2-7b"), method="qlora", seq_len=512, micro_batch=1, grad_ckpt=True
    )
    report = make_plan(work, get_gpu("rtx4090"), micro_given=True)
    sim = simulate(work)
    print(
        f"- 4-bit base (NF4 + double quant; embeddings, norms, lm_head in fp32 as "
        f"prepare_model_for_kbit_training leaves them): "
        f"{work.base_param_bytes() / 1e9:.2f} GB (QLoRA paper: ≈5 GB for the 7B model)"
    )
    print(
        f"- tensor peak: analytic {report.breakdown.tensor_peak / GIB:.2f} GiB, simulated "
        f"{sim.total / GIB:.2f} GiB; with CUDA context and allocator slack "
        f"{report.total / GIB:.2f} GiB of {report.usable / GIB:.2f} usable: "
        f"{'fits' if report.fits else 'does not fit'}; largest micro-batch "
        f"{report.max_micro_batch}\n"
    )


def plan_speed() -> None:
    print("## 6. Analytic plan time (6 layouts ranked, micro-batch search)\n")
    print("| model | params | plan ms |\n|---|---|---|")
    gpu = get_gpu("h100")
    for name in shipped_archs():
        work = Workload(
            arch=load_arch(name),
            strategy="zero3",
            gpus_per_node=8,
            nodes=2,
            seq_len=4096,
            grad_ckpt=True,
        )
        start = time.perf_counter()
        make_plan(work, gpu)
        ms = (time.perf_counter() - start) * 1000
        print(f"| {name} | {work.arch.n_params / 1e9:.2f}B | {ms:.1f} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="A subset of every section.")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    zero_figure()
    analytic_vs_simulated(args.quick)
    if not args.quick:
        extrapolation()
    measured(args.quick)
    qlora_7b()
    plan_speed()
    print(f"_total bench time: {time.perf_counter() - start:.0f} s_")


if __name__ == "__main__":
    main()
