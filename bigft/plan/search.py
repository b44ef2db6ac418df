"""`bigft plan --max-seq-len`: the longest sequence that fits one GPU at a micro-batch.

Memory grows with the sequence length, so the answer is found by bisection over lengths
in steps of `SEQ_STEP` tokens, up to the model's position limit: first with the analytic
model (instant), then, when asked, with the simulation, started from the analytic answer
(two simulated steps when both agree, a few more where they do not).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bigft.plan.batch import DEFAULT_CPU_MEM_GIB, host_shortfall, overhead_bytes, total_bytes
from bigft.plan.batch import usable_bytes as usable
from bigft.plan.hardware import GPU
from bigft.plan.workload import Workload

SEQ_STEP = 256  # lengths searched: multiples of this many tokens


@dataclass
class SeqLenAnswer:
    """The longest sequence that fits (0: not even SEQ_STEP tokens), and how it was found."""

    analytic: int
    limit: int  # the longest length searched: the model's position limit
    simulated: int | None = None  # confirmed by the simulation (None: not simulated)
    sim_result: Any = None  # SimResult of the step at `simulated`
    simulations: int = 0  # simulated steps the search ran

    @property
    def seq_len(self) -> int:
        """The answer: the simulation's where it ran, the analytic model's otherwise."""
        return self.analytic if self.simulated is None else self.simulated


def longest(fits: Callable[[int], bool], step: int, limit: int, guess: int | None = None) -> int:
    """The largest multiple of `step` up to `limit` for which `fits` holds (0 if none),
    for a `fits` that stays false once it is false. With a `guess`, the search gallops
    out from it, so a close guess costs two or three calls."""
    top = limit // step
    cache: dict[int, bool] = {}

    def ok(k: int) -> bool:
        if k not in cache:
            cache[k] = k == 0 or fits(k * step)
        return cache[k]

    lo, hi = 0, top + 1  # ok(lo) holds; hi is past the end or known not to fit
    if guess is not None and top >= 1:
        g, gap = min(max(guess // step, 1), top), 1
        if ok(g):
            lo = g
            while lo + gap <= top and ok(lo + gap):
                lo, gap = lo + gap, gap * 2
            hi = min(lo + gap, top + 1)
        else:
            hi = g
            while hi - gap >= 1 and not ok(hi - gap):
                hi, gap = hi - gap, gap * 2
            lo = max(hi - gap, 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo * step


def max_seq_len(
    work: Workload,
    gpu: GPU,
    margin: float = 0.05,
    cpu_mem_gib: float = DEFAULT_CPU_MEM_GIB,
    simulate: bool = False,
    full_depth: bool = False,
) -> SeqLenAnswer:
    """The longest sequence of `work` (at its micro-batch) whose step fits `gpu` with
    `margin` kept free: by the analytic model, and confirmed by the simulation when
    `simulate` (the simulated answer is searched from the analytic one)."""
    capacity = usable(gpu, margin)
    limit = work.arch.max_positions

    def analytic_fits(seq: int) -> bool:
        at = work.with_(seq_len=seq)
        return total_bytes(at) <= capacity and not host_shortfall(at, cpu_mem_gib)

    answer = SeqLenAnswer(analytic=longest(analytic_fits, SEQ_STEP, limit), limit=limit)
    if not simulate:
        return answer
    from bigft.plan.simulate import simulate as run

    results: dict[int, Any] = {}

    def simulated_fits(seq: int) -> bool:
        at = work.with_(seq_len=seq)
        results[seq] = run(at, full_depth=full_depth)
        peak = results[seq].total
        fits = peak + overhead_bytes(peak, work.world_size) <= capacity
        return fits and not host_shortfall(at, cpu_mem_gib)

    answer.simulated = longest(simulated_fits, SEQ_STEP, limit, guess=answer.analytic)
    answer.sim_result = results.get(answer.simulated)
    answer.simulations = len(results)
    return answer
