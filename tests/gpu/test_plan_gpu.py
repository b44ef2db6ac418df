"""The planner against torch.cuda.max_memory_allocated for a real step (needs CUDA)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SMALL = {
    "model_type": "llama",
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}


@pytest.mark.parametrize(
    ("method", "seq", "mb", "ckpt"),
    [
        ("full", 1024, 2, False),
        ("full", 2048, 1, True),
        ("lora", 2048, 4, False),
        ("lora", 4096, 2, True),
    ],
)
def test_prediction_matches_max_memory_allocated(method: str, seq: int, mb: int, ckpt: bool):
    from bigft.plan import analytic, simulate
    from bigft.plan.arch import arch_from_config
    from bigft.plan.simulate import simulate_depth
    from bigft.plan.workload import Workload

    arch = arch_from_config(SMALL, "llama-150m")
    work = Workload(arch=arch, method=method, seq_len=seq, micro_batch=mb, grad_ckpt=ckpt)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    phases = simulate_depth(work, arch.layers, fake=False, device="cuda")
    cuda_peak = torch.cuda.max_memory_allocated() - base
    tracked = max(sum(p.values()) for p in phases.values())
    predicted = analytic(work).tensor_peak
    simulated = simulate(work).total
    # max_memory_allocated also sees the warm-up step, whose peak is not higher.
    for estimate in (predicted, simulated, tracked):
        assert abs(estimate - cuda_peak) <= 0.10 * cuda_peak, (estimate, cuda_peak)
