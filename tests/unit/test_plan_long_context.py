"""The planner's long-sequence options: activation offload, tiled MLP, compile, and
`bigft plan --max-seq-len`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bigft.commands import app
from bigft.config_io import load_config
from bigft.errors import ConfigError
from bigft.plan import analytic, custom_gpu, get_gpu, load_arch, simulate, workload_from_config
from bigft.plan.arch import arch_from_config
from bigft.plan.batch import overhead_bytes, total_bytes, usable_bytes
from bigft.plan.layers import OFFLOAD_IN_FLIGHT, step_activations
from bigft.plan.memory import phase_breakdowns
from bigft.plan.search import SEQ_STEP, longest, max_seq_len
from bigft.plan.simulate import simulate_depth
from bigft.plan.workload import Workload
from tests.helpers import SMALL_LLAMA

runner = CliRunner()
SMALL = SMALL_LLAMA


def qlora_8b(**changes: object) -> Workload:
    base = Workload(
        arch=load_arch("llama-3.1-8b"),
        method="qlora",
        optimizer="paged_adamw_8bit",
        grad_ckpt=True,
        seq_len=16384,
    )
    return base.with_(**changes)


def test_offload_moves_the_checkpointed_inputs_to_host_memory() -> None:
    work = qlora_8b()
    off = work.with_(offload_activations=True)
    layer_input = 2 * 4096 * 16384  # one bf16 B x L x H tensor
    moved = (32 - OFFLOAD_IN_FLIGHT) * layer_input
    kept, gone = step_activations(work), step_activations(off)
    assert kept.all_layers - gone.all_layers == pytest.approx(moved)
    assert gone.host == pytest.approx(32 * layer_input)  # every input is copied out
    plain, offloaded = analytic(work), analytic(off)
    assert plain.cpu_bytes == 0 and offloaded.cpu_bytes == offloaded.offloaded_activations
    assert offloaded.offloaded_activations == pytest.approx(32 * layer_input)
    assert plain.tensor_peak - offloaded.tensor_peak == pytest.approx(moved, rel=0.05)
    with pytest.raises(ConfigError, match="needs gradient checkpointing"):
        work.with_(grad_ckpt=False, offload_activations=True)


def test_tiled_mlp_divides_the_mlp_intermediates() -> None:
    work = qlora_8b(seq_len=32768)
    assert work.mlp_tiles == 1
    assert work.with_(tiled_mlp=True).mlp_tiles == 8  # ceil(32k tokens / hidden 4096)
    assert work.with_(tiled_mlp=True, tiled_mlp_shards=64, seq_len=16).mlp_tiles == 16
    recompute = step_activations(work).layer_bw
    tiled = step_activations(work.with_(tiled_mlp=True)).layer_bw
    # The recomputed top layer held 3 bf16 x 14,336 intermediates per token, plus their
    # gradients: 1/8 of them remain.
    mlp = 3 * 2 * 14336 * 32768
    assert recompute - tiled > 7 / 8 * mlp
    with pytest.raises(ConfigError, match="tiled_mlp_shards needs tiled_mlp"):
        work.with_(tiled_mlp_shards=4)


@pytest.mark.parametrize(
    "changes",
    [
        {"tiled_mlp": True, "tiled_mlp_shards": 4},  # tiles under every layer's own graph
        {"tiled_mlp": True, "tiled_mlp_shards": 4, "grad_ckpt": True},  # tiles in recompute
    ],
    ids=["tiled", "tiled+ckpt"],
)
def test_tiled_mlp_matches_a_real_cpu_step(changes: dict) -> None:
    work = Workload(
        arch=arch_from_config(SMALL, "llama-19m"),
        method="lora",
        seq_len=256,
        micro_batch=2,
        device="cpu",
        **changes,
    )
    phases = simulate_depth(work, work.arch.layers, fake=False)
    measured = {name: sum(p.values()) for name, p in phases.items()}
    estimated = phase_breakdowns(work)
    untiled = phase_breakdowns(work.with_(tiled_mlp=False, tiled_mlp_shards=None))
    # The top layer's backward is where the tiles (forward-saved or recomputed) show.
    top, untiled_top = sum(estimated["top"].values()), sum(untiled["top"].values())
    assert top == pytest.approx(measured["top"], rel=0.05)
    assert untiled_top - top > 0.04 * untiled_top  # the tiling's saving is real...
    assert measured["top"] < untiled_top - 0.5 * (untiled_top - top)  # ...and measured


@pytest.mark.parametrize(
    "changes",
    [
        {"seq_len": 4096, "grad_ckpt": False, "tiled_mlp": True, "tiled_mlp_shards": 4},
        {"seq_len": 16384, "tiled_mlp": True, "offload_activations": True},
    ],
    ids=["lora-4k-tiled", "lora-16k-tiled-offload"],
)
def test_analytic_matches_simulated_8b_long_context(changes: dict) -> None:
    work = Workload(arch=load_arch("llama-3.1-8b"), method="lora", grad_ckpt=True).with_(**changes)
    sim = simulate(work)
    assert analytic(work).tensor_peak == pytest.approx(sim.total, rel=0.05)
    if work.offload_activations:
        assert any("offload" in note for note in sim.notes)


def _config(tmp_path: Path, **train: object) -> Path:
    path = tmp_path / "cfg.yaml"
    cfg = {
        "model": {"name_or_path": "llama-3.1-8b"},
        "data": {"train": "rows.jsonl"},
        "method": {
            "name": "qlora",
            "gradient_checkpointing": "full",
            "offload_activations": True,
            "tiled_mlp": True,
            "tiled_mlp_shards": 4,
        },
        "train": {"seq_len": 8192, "micro_batch_size": 1, **train},
        "hardware": {"gpu": "rtx4090"},
        "output_dir": str(tmp_path / "out"),
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_config_options_reach_the_plan_and_compile_changes_nothing(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, compile=True))
    work = workload_from_config(cfg)
    assert (work.offload_activations, work.tiled_mlp, work.mlp_tiles, work.compile) == (
        True,
        True,
        4,
        True,
    )
    assert analytic(work).tensor_peak == analytic(work.with_(compile=False)).tensor_peak
    plan = json.loads(runner.invoke(app, ["plan", str(_config(tmp_path)), "--json"]).stdout)
    host = 32 * 2 * 4096 * 8192
    assert plan["offloaded_activation_bytes"] == plan["cpu_bytes_per_gpu"] == host
    assert plan["offload_activations"] is True and plan["tiled_mlp_tiles"] == 4
    table = " ".join(runner.invoke(app, ["plan", str(_config(tmp_path))]).output.split())
    assert "host (CPU) memory per GPU, offloaded: 2.00 GiB (activations 2.00)" in table
    assert "MLP in 4 tiles" in table


def test_longest_bisects_and_gallops_from_a_guess() -> None:
    calls: list[int] = []

    def fits(n: int) -> bool:
        calls.append(n)
        return n <= 10_000

    assert longest(fits, 256, 131072) == 9984
    assert len(calls) <= 10
    calls.clear()
    assert longest(fits, 256, 131072, guess=9984) == 9984 and calls == [9984, 10240]
    calls.clear()
    assert longest(fits, 256, 131072, guess=12000) == 9984 and len(calls) <= 6
    assert longest(lambda n: True, 256, 4096) == 4096  # the limit itself
    assert longest(lambda n: False, 256, 4096, guess=1024) == 0


def test_max_seq_len_is_the_longest_that_fits() -> None:
    gpu = get_gpu("rtx4090")
    capacity = usable_bytes(gpu, 0.05)
    work = qlora_8b()
    answer = max_seq_len(work, gpu)
    assert answer.seq_len % SEQ_STEP == 0 and answer.simulated is None
    assert total_bytes(work.with_(seq_len=answer.seq_len)) <= capacity
    assert total_bytes(work.with_(seq_len=answer.seq_len + SEQ_STEP)) > capacity
    # Each option lengthens what fits: chunked loss, offload, tiled MLP.
    full = max_seq_len(work.with_(loss_impl="full"), gpu).seq_len
    offload = max_seq_len(work.with_(offload_activations=True), gpu).seq_len
    tiled = max_seq_len(work.with_(offload_activations=True, tiled_mlp=True), gpu).seq_len
    assert full < answer.seq_len < offload < tiled
    assert tiled >= 32768


def test_max_seq_len_confirmed_by_simulation() -> None:
    work = Workload(
        arch=arch_from_config({**SMALL, "max_position_embeddings": 8192}, "llama-19m"),
        method="lora",
        grad_ckpt=True,
        micro_batch=2,
    )
    gpu = custom_gpu(1.2)
    capacity = usable_bytes(gpu, 0.05)
    answer = max_seq_len(work, gpu, simulate=True)
    assert answer.simulated is not None and 2 <= answer.simulations <= 6
    assert abs(answer.simulated - answer.analytic) <= 0.05 * answer.analytic
    # The simulated answer fits by the simulation, and one step longer does not.
    peak = answer.sim_result.total
    assert peak + overhead_bytes(peak, 1) <= capacity
    longer = simulate(work.with_(seq_len=answer.simulated + SEQ_STEP)).total
    assert longer + overhead_bytes(longer, 1) > capacity


def test_cli_max_seq_len(tmp_path: Path) -> None:
    path = _config(tmp_path)
    result = runner.invoke(app, ["plan", str(path), "--max-seq-len", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    found = plan["max_seq_len"]
    assert plan["seq_len"] == found["seq_len"] == found["analytic"] and found["simulated"] is None
    assert found["seq_len"] > 8192 and plan["fits"] is True
    table = " ".join(runner.invoke(app, ["plan", str(path), "--max-seq-len"]).output.split())
    assert f"longest sequence at micro-batch 1: {found['seq_len']:,} tokens" in table
    assert "dominated by" in table
    both = runner.invoke(app, ["plan", str(path), "--max-seq-len", "--seq-len", "4096"])
    assert both.exit_code == 2 and "not both" in both.stderr
    tiny = runner.invoke(app, ["plan", str(path), "--max-seq-len", "--gpu-mem", "4"])
    assert tiny.exit_code == 2 and "not even 256 tokens fit" in " ".join(tiny.stderr.split())
