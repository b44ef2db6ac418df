"""How a plan is shown: a rich table for people, one JSON object for programs."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from bigft.plan.hardware import GIB
from bigft.plan.planner import PlanReport
from bigft.plan.search import SEQ_STEP, SeqLenAnswer

ROWS = (
    ("params", "parameters"),
    ("grads", "gradients"),
    ("optimizer", "optimizer states"),
    ("activations", "activations (layers)"),
    ("logits", "logits / loss"),
    ("buffers", "framework buffers"),
)
PHASES = {
    "forward": "end of forward",
    "loss": "loss backward",
    "lm_head": "lm_head backward",
    "top": "top layer's backward",
    "post": "bottom layer's backward",
    "opt": "optimizer step",
    "head": "forward / loss backward",
    "mid": "a middle layer's backward",
}


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f}"


def plan_json(report: PlanReport) -> dict[str, Any]:
    """The `--json` object: integers in bytes, every layout with its verdict."""
    b, w = report.breakdown, report.work
    per_gpu = {key: int(getattr(b, key)) for key, _ in ROWS}
    per_gpu["activations"] += per_gpu["logits"]  # 'activations' includes the loss's logits
    per_gpu["overhead"] = int(report.overhead)
    per_gpu["tensor_peak"] = int(b.tensor_peak)
    per_gpu["total"] = int(report.total)
    out: dict[str, Any] = {
        "model": w.arch.name,
        "params": int(w.arch.n_params),
        "trainable_params": int(w.trainable_params),
        "method": w.method,
        "strategy": w.strategy,
        "optimizer": w.optimizer,
        "gpu": {
            "name": report.gpu.name,
            "memory_bytes": report.gpu.memory_bytes,
            "usable_bytes": int(report.usable),
            "margin": report.margin,
            "source": report.gpu_source or None,
        },
        "gpus_per_node": w.gpus_per_node,
        "nodes": w.nodes,
        "seq_len": w.seq_len,
        "grad_ckpt": w.grad_ckpt,
        "per_gpu_bytes": per_gpu,
        "peak_phase": b.phase,
        "micro_batch_size": report.micro_batch,
        "max_micro_batch_size": report.max_micro_batch,
        "grad_accum": report.grad_accum,
        "global_batch_size": report.global_batch
        or report.micro_batch * report.grad_accum * w.world_size,
        "fits": report.fits,
        "strategies": [
            {
                "name": o.name,
                "fits": o.fits,
                "total_bytes": int(o.total_bytes),
                "micro_batch_size": o.micro_batch,
                "grad_accum": o.grad_accum,
                "relative_step_time": round(o.relative, 3) if o.fits else None,
                "reason": o.reason or None,
            }
            for o in report.layouts
        ],
        "notes": report.notes,
        "message": report.message,
    }
    out["offload_activations"] = w.offload_activations
    out["tiled_mlp_tiles"] = w.mlp_tiles
    out["compile"] = w.compile
    if b.cpu_bytes:
        out["cpu_bytes_per_gpu"] = int(b.cpu_bytes)  # host memory: offloaded states + activations
        out["offloaded_activation_bytes"] = int(b.offloaded_activations)
    if report.simulated is not None:
        sim = report.simulated
        out["simulated"] = {
            "per_gpu_bytes": {
                **{k: int(v) for k, v in sim.peak.items()},
                "tensor_peak": int(sim.total),
            },
            "layers_simulated": sim.layers_simulated,
            "seconds": round(sim.seconds, 2),
            "notes": sim.notes,
        }
    return out


def print_plan(report: PlanReport, console: Console) -> None:
    """The per-GPU table, the batch plan and the ranked layouts."""
    w, b, gpu = report.work, report.breakdown, report.gpu
    console.print(
        f"[bold]bigft plan[/]: {w.arch.name} ({w.arch.n_params / 1e9:.2f}B params, "
        f"{w.trainable_params / 1e9:.3g}B trainable) | {w.method} | {w.strategy} on "
        f"{w.nodes} x {w.gpus_per_node} x {gpu.name} | seq {w.seq_len} | "
        f"grad ckpt {_ckpt(w)} | {w.optimizer}"
        + (f" | MLP in {w.mlp_tiles} tiles" if w.mlp_tiles > 1 else "")
        + (" | compiled" if w.compile else ""),
        highlight=False,
    )
    if report.gpu_source:
        console.print(f"gpu: {gpu.name} ({report.gpu_source})", highlight=False)
    sim = report.simulated
    table = Table(title=f"per GPU at micro-batch {report.micro_batch} (GiB)", title_justify="left")
    table.add_column("component")
    table.add_column("analytic", justify="right")
    if sim is not None:
        table.add_column("simulated", justify="right")
    for key, label in ROWS:
        row = [label, _gib(getattr(b, key))]
        if sim is not None:
            value = sim.peak.get(key, 0.0) if key != "logits" else None
            row.append("(in activations)" if value is None else _gib(value))
        table.add_row(*row)
    table.add_row("CUDA context + allocator", _gib(report.overhead), *([""] if sim else []))
    total = [f"[bold]{_gib(report.total)}[/]"]
    if sim is not None:
        total.append(f"[bold]{_gib(sim.total + report.overhead)}[/]")
    table.add_row("[bold]total[/]", *total)
    console.print(table)
    verdict = "[green]fits[/]" if report.fits else "[red]does not fit[/]"
    console.print(
        f"usable {_gib(report.usable)} of {_gib(gpu.memory_bytes)} GiB ({report.margin:.0%} "
        f"margin): {verdict}; peak during the {PHASES.get(b.phase, b.phase)}",
        highlight=False,
    )
    if b.cpu_bytes:
        parts = [f"activations {_gib(b.offloaded_activations)}"] if b.offloaded_activations else []
        if b.cpu_bytes > b.offloaded_activations:
            parts.append(f"ZeRO states {_gib(b.cpu_bytes - b.offloaded_activations)}")
        console.print(
            f"host (CPU) memory per GPU, offloaded: {_gib(b.cpu_bytes)} GiB ({', '.join(parts)})",
            highlight=False,
        )
    given = "given" if report.micro_batch_given else "chosen"
    console.print(
        f"micro-batch {report.micro_batch} ({given}; largest that fits: "
        f"{report.max_micro_batch}) x grad accum {report.grad_accum} x {w.world_size} GPU(s) "
        f"= global batch {report.micro_batch * report.grad_accum * w.world_size}",
        highlight=False,
    )
    if sim is not None:
        console.print(
            f"simulated one step at {sim.layers_simulated} layer(s) in {sim.seconds:.1f} s "
            "(FakeTensorMode + MemTracker), extrapolated to the model's depth",
            highlight=False,
        )
        for note in sim.notes:
            console.print(f"[yellow]simulation[/]: {note}", highlight=False)
    _print_layouts(report, console)
    for note in report.notes:
        console.print(f"[yellow]note[/]: {note}", highlight=False)


def _ckpt(w: Any) -> str:
    if not w.grad_ckpt:
        return "off"
    return "on, inputs offloaded to host" if w.offload_activations else "on"


def seq_len_json(answer: SeqLenAnswer) -> dict[str, Any]:
    """The `max_seq_len` object of `--max-seq-len --json`."""
    return {
        "seq_len": answer.seq_len,
        "analytic": answer.analytic,
        "simulated": answer.simulated,
        "simulations": answer.simulations,
        "step": SEQ_STEP,
        "limit": answer.limit,
    }


def print_seq_len(answer: SeqLenAnswer, report: PlanReport, console: Console) -> None:
    """The answer of `--max-seq-len` and what dominates memory at that length."""
    b, w = report.breakdown, report.work
    how = "analytic model"
    if answer.simulated is not None:
        how = (
            f"analytic {answer.analytic:,}, simulated {answer.simulated:,} "
            f"({answer.simulations} simulated steps)"
        )
    limit = " (the model's position limit)" if answer.seq_len + SEQ_STEP > answer.limit else ""
    console.print(
        f"[bold]longest sequence at micro-batch {w.micro_batch}[/]: {answer.seq_len:,} tokens"
        f"{limit} in steps of {SEQ_STEP} ({how})",
        highlight=False,
    )
    parts = sorted(((getattr(b, k), label) for k, label in ROWS), reverse=True)
    top = ", ".join(f"{label} {_gib(n)}" for n, label in parts[:3] if n > 0)
    console.print(
        f"there, memory peaks in the {PHASES.get(b.phase, b.phase)}, dominated by {top} GiB",
        highlight=False,
    )


def _print_layouts(report: PlanReport, console: Console) -> None:
    table = Table(
        title="layouts, fastest first (rel. time: time per token, fastest = 1.00)",
        title_justify="left",
    )
    for name in ("layout", "fits", "micro-batch", "accum", "per GPU GiB", "rel. time"):
        table.add_column(name, justify="left" if name in ("layout", "fits") else "right")
    for o in report.layouts:
        table.add_row(
            o.name,
            "yes" if o.fits else "no",
            str(o.micro_batch) if o.fits else "-",
            str(o.grad_accum) if o.fits else "-",
            _gib(o.total_bytes),
            f"{o.relative:.2f}" if o.fits else ("see below" if o.reason else "-"),
        )
    console.print(table)
    if report.work.world_size == 1:
        console.print(
            "rel. time on one GPU: no collectives, so layouts that keep everything on the "
            "GPU tie; offload adds its PCIe traffic and the optimizer step on the CPU",
            highlight=False,
        )
    for o in report.layouts:
        if o.reason:
            console.print(f"[yellow]{o.name}[/]: {o.reason}", highlight=False)
