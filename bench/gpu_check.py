"""GPU checks in one command: packed flash-attention isolation, planner vs measured peak
memory, tokens/s and MFU, FSDP2's gradient reduce dtype, and the memory / speed options.

    python bench/gpu_check.py --out gpu.json           # one H100 / H200, under 8 minutes
    python bench/gpu_check.py --tiny --out tiny.json   # CPU smoke run of the same code

Nothing is downloaded. The models are random-init Llamas shaped like Llama-3.1-8B (hidden
4096, intermediate 14336, 32 heads, 8 KV heads, vocab 128256, llama3 rope, theta 500000)
with fewer layers (--layers; --full-layers for full fine-tuning, whose fp32 weights and
AdamW states must fit one GPU), saved with save_pretrained beside bigft.tiny's character
tokenizer and loaded back by bigft's own loading code. --tiny: a 2-layer Llama of hidden
64 on the CPU.

1. packed isolation: rows packed by `bigft.data.packing.pack`, a micro-batch of 2 collated
   by `bigft.data.labeled.make_collator` for the attention the model runs (flash: one
   [1, 2L] row, transformers' varlen path; sdpa: [2, L] with a mask from position_ids);
   each sequence's logits against the same sequence run alone. The unflattened [2, L]
   batch under flash (without flash-attn: a probe with flash's control flow) shows the
   cross-sequence attention the flattening prevents.
2. planner memory: LoRA, QLoRA and full fine-tuning through `bigft.config_io.load_config`,
   `bigft.loop.setup.setup` and the loop's `train_step` (bf16, checkpointing as the recipes in
   configs/): torch.cuda.max_memory_allocated over steady-state steps against the
   planner's tensor peak for the same config and micro-batch.
3. throughput: tokens/s of those steps; MFU = model FLOPs / time / the GPU's dense bf16
   peak in bigft.plan.hardware.
4. fsdp2 reduce dtype: one-process FSDP2 through bigft (NCCL on a GPU): the reduce dtype
   of every FSDP2 parameter group, engine_report's, and the sharded gradients' dtype.
5. options: the QLoRA recipe with full logits, the chunked loss, and the chunked loss with
   activation offload, tiled MLP or torch.compile: peak memory and tokens/s of each.

A failing check prints its error and the others still run; the exit code is 1 if any
failed. On CUDA each check runs in a child process (a clean peak-memory counter, no engine
state carried over, a crash or hang costs one check) within --budget-s; --tiny runs them
in this process. One file so that one command does it all.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import itertools
import json
import os
import random
import resource
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
for _name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Llama-3.1-8B's published config.json but its depth (bigft/archs/llama-3.1-8b.json).
LLAMA_31_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
TINY |= {"num_key_value_heads": 2, "max_position_embeddings": 1024}
METHODS = ("lora", "qlora", "full")
CHECKS = ("isolation", *METHODS, "options", "fsdp2")  # --tiny: fsdp2 leaves accelerate state
# Each method as its recipe in configs/ trains it (rank, checkpointing), with AdamW: paged
# optimizers keep their states in managed memory, which max_memory_allocated misses.
RECIPES: dict[str, dict[str, Any]] = {
    "lora": {
        "name": "lora",
        "lora": {"r": 64, "alpha": 128, "dropout": 0.05, "use_rslora": True},
        "gradient_checkpointing": "every_k",
        "checkpoint_every_k": 2,
    },
    "qlora": {
        "name": "qlora",
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "quant": {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
        "gradient_checkpointing": "full",
    },
    "full": {"name": "full", "gradient_checkpointing": "full"},
}
# Seconds in the log count from the parent's start, in the child processes too.
START = float(os.environ.get("BIGFT_GPU_CHECK_T0") or time.time())


def log(message: str) -> None:
    print(f"[gpu_check {time.time() - START:6.1f}s] {message}", flush=True)


@dataclass
class Settings:
    """What every check runs with (passed to child processes as JSON)."""

    tiny: bool
    layers: int
    full_layers: int
    seq_len: int
    micro_batch: int
    warmup_steps: int
    steps: int
    isolation_seq_len: int
    memory_tolerance: float
    gpu: str | None
    workdir: str


# ------------------------------------------------------------------- models, data, runs


def model_dir(s: Settings, layers: int) -> Path:
    """A saved random-init model of `layers` layers, built once per work directory."""
    path = Path(s.workdir) / "models" / f"{'tiny' if s.tiny else 'llama3.1-8b-shaped'}-{layers}l"
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from bigft.tiny import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = LlamaConfig(
        **(dict(TINY, vocab_size=len(tokenizer)) if s.tiny else LLAMA_31_8B),
        num_hidden_layers=layers,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if s.tiny else torch.bfloat16  # bf16, as checkpoints are published
    log(f"building {path.name} on {device}")
    torch.manual_seed(0)
    with torch.device(device):  # initializing billions of weights on a GPU takes no time
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    partial = path.with_name(path.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(path)  # a build killed half-way leaves no directory that looks complete
    del model
    free_device_memory()
    return path


def flash_usable() -> bool:
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def write_run_config(
    s: Settings, name: str, method: str, layers: int, extra: dict[str, Any] | None = None
) -> Path:
    """A bigft YAML for `method` on the saved model and a text file of random documents
    (1/8 to all of seq_len characters: tokens, with the character tokenizer). `extra`
    sections are merged into the config's own (a new key adds, a known one replaces)."""
    import yaml

    root = Path(s.workdir) / "runs" / name
    root.mkdir(parents=True, exist_ok=True)
    steps = s.warmup_steps + s.steps + 1
    rng = random.Random(0)
    docs, tokens = [], 0
    while tokens < (steps * s.micro_batch + 2) * s.seq_len * 1.3:
        n = rng.randint(max(s.seq_len // 8, 4), s.seq_len - 4)  # bos and eos are added
        docs.append(json.dumps({"text": "".join(rng.choices("abcdefghij klmnopqrstuvwxyz", k=n))}))
        tokens += n
    (root / "train.jsonl").write_text("\n".join(docs) + "\n")
    config = {
        "model": {
            "name_or_path": str(model_dir(s, layers)),
            # full fine-tuning keeps fp32 master weights (auto); adapters get a bf16 base
            "dtype": "auto" if method == "full" else "bfloat16",
            # named, so that the planner plans for the attention that runs
            "attn_implementation": "flash_attention_2" if flash_usable() else "sdpa",
        },
        "data": {
            "format": "text",
            "train": str(root / "train.jsonl"),
            "split": {"train": 1.0, "validation": 0.0},
            "cache": False,
        },
        "method": RECIPES[method],
        "optim": {"name": "adamw", "lr": 1.0e-5},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "train": {
            "steps": steps,
            "seq_len": s.seq_len,
            "micro_batch_size": s.micro_batch,
            "grad_accum": 1,
            "precision": "bf16",
            "seed": 0,
        },
        "checkpoint": {"export": False},
        "logging": {"progress_bar": False, "trackers": []},
        "output_dir": str(root / "out"),
    }
    for section, values in (extra or {}).items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **values}
        else:
            config[section] = values
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root / "config.yaml"


def free_device_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def bigft_run(config: Path) -> Iterator[Any]:
    """`bigft.loop.setup.setup` on a config file; afterwards everything the run held is freed
    and accelerate's per-process state reset, so the next check can build another engine."""
    from accelerate.state import AcceleratorState
    from rich.console import Console

    from bigft.config_io import load_config
    from bigft.loop.setup import setup

    run = setup(load_config(config), Console(stderr=True))
    try:
        run.model.train()
        yield run
    finally:
        run.accelerator.free_memory()
        run.model = run.optimizer = run.scheduler = None
        AcceleratorState._reset_state(reset_partial_state=True)
        free_device_memory()


def next_step(run: Any, batches: Iterator[dict[str, Any]]) -> list[dict[str, Any]]:
    """The next optimizer step's micro-batches on the host, as the loop hands them to
    `train_step` (which counts their tokens there and moves them)."""
    return [next(batches) for _ in range(run.layout.grad_accum)]


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------ 1. packed isolation

PROBE = "bigft_varlen_probe"  # no "flash" in the name: transformers would look for kernels


def register_flash_probe() -> None:
    """An attention with flash_attention_2's control flow, on any device: per-sequence
    (varlen) attention when transformers recognises a packed batch from position_ids,
    causal attention over the whole row otherwise (as tests/unit/test_packed_attention)."""
    import torch
    import torch.nn.functional as F
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
    from transformers.modeling_flash_attention_utils import (
        _is_packed_sequence,
        prepare_fa_kwargs_from_position_ids,
    )

    def attention(
        module: Any, q: Any, k: Any, v: Any, mask: Any, scaling: float | None = None, **kw: Any
    ) -> tuple[torch.Tensor, None]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        if _is_packed_sequence(kw.get("position_ids"), q.shape[0]):
            (cu_seqlens, _), _ = prepare_fa_kwargs_from_position_ids(kw["position_ids"])
            out = torch.zeros_like(q)
            for a, b in itertools.pairwise(cu_seqlens.tolist()):
                out[:, :, a:b] = F.scaled_dot_product_attention(
                    q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, scale=scaling
                )
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(PROBE, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PROBE, flash_attention_mask)


def isolation_rows(tokenizer: Any, seq_len: int) -> list[dict[str, list[int]]]:
    """Distinct sequences of 1/10 to 1/3 of a row, about three packed rows of them; the
    first label of each is -100, as bigft's formats make it."""
    rng, rows, total = random.Random(1), [], 0
    while total < 3 * seq_len:
        text = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz ", k=rng.randint(4, seq_len // 3)))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": ids, "labels": [-100, *ids[1:]]})
        total += len(ids)
    return rows


def packed_vs_alone(model: Any, batch: dict[str, Any], rows: list[dict[str, Any]]) -> dict:
    """Max |logit difference| between every sequence of `batch` and the same sequence run
    alone (a batch of one, no position_ids)."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, use_cache=False).logits.float()
        logits = logits.reshape(-1, logits.size(-1))
        ids, pos = batch["input_ids"].reshape(-1).tolist(), batch["position_ids"].reshape(-1)
        bounds = [*torch.nonzero(pos == 0).flatten().tolist(), len(ids)]
        known = {tuple(r["input_ids"]) for r in rows}
        worst, scale, compared = 0.0, 0.0, 0
        for a, b in itertools.pairwise(bounds):
            if tuple(ids[a:b]) not in known:  # the padding that fills a row's tail
                continue
            alone = model(torch.tensor([ids[a:b]], device=device), use_cache=False).logits[0]
            worst = max(worst, float((logits[a:b] - alone.float()).abs().max()))
            scale = max(scale, float(alone.abs().max()))
            compared += 1
    return {"max_abs_diff": worst, "logit_scale": scale, "sequences": compared}


def check_packed_isolation(s: Settings) -> dict[str, Any]:
    """Check 1: the batches bigft hands the model keep packed sequences apart."""
    import torch

    from bigft.config import Config, ModelConfig
    from bigft.data.labeled import make_collator
    from bigft.data.packing import pack
    from bigft.model.attention import attention_implementation
    from bigft.model.load import load_model, load_tokenizer

    cuda = torch.cuda.is_available()
    dtype = "bfloat16" if cuda else "float32"  # flash-attention computes in 16 bits only
    base = ModelConfig(name_or_path=str(model_dir(s, s.layers)), dtype=dtype)
    tokenizer = load_tokenizer(base)
    rows = isolation_rows(tokenizer, s.isolation_seq_len)
    packed = pack(rows, s.isolation_seq_len, seed=0, pad_token_id=tokenizer.pad_token_id)
    micro = [packed[0], packed[1]]
    data = {"format": "text", "train": "unused.jsonl", "packing": True}
    cfg = Config.model_validate({"model": base.model_dump(), "data": data, "output_dir": "-"})
    entries: dict[str, dict[str, Any]] = {}

    def record(name: str, model: Any, batch: dict[str, Any], expect_isolated: bool) -> None:
        found = packed_vs_alone(model, batch, rows)
        # fp32: the paths agree to rounding. bf16: ~1% of the largest logit apart (16
        # layers, measured on CPU); attention across a boundary moves logits by O(100%).
        scale = found["logit_scale"]
        found["tolerance"] = 1e-4 if dtype == "float32" else 0.05 * scale
        found["shape"] = list(batch["input_ids"].shape)
        found["isolated"] = found["max_abs_diff"] <= found["tolerance"]
        ok = found["isolated"] and found["sequences"] >= 3
        found["status"] = "ok" if ok or not expect_isolated else "failed"
        found["summary"] = f"max |diff| {found['max_abs_diff']:.3g} (tolerance "
        found["summary"] += f"{found['tolerance']:.3g}), {found['sequences']} sequences"
        if not expect_isolated:  # the unflattened flash batch: the bug flattening prevents
            found["bug_reproduced"] = not found["isolated"]
            found["summary"] += ": leaks across sequences" if not found["isolated"] else ""
        entries[name] = found
        log(f"isolation {name}, shape {found['shape']}: {found['summary']}")

    def load(attn: str) -> Any:
        model = load_model(base.model_copy(update={"attn_implementation": attn}), "fp32")
        return model.to("cuda" if cuda else "cpu").eval()

    model = load("sdpa")
    runs = attention_implementation(model)
    record("sdpa, [2, L] rows", model, make_collator(cfg, tokenizer, runs)(micro), True)
    flat = make_collator(cfg, tokenizer, "flash_attention_2")(micro)
    record("sdpa, [1, 2L] flattened", model, flat, True)
    if flash_usable():
        del model
        free_device_memory()
        model = load("flash_attention_2")
        runs = attention_implementation(model)
        batch = make_collator(cfg, tokenizer, runs)(micro)
        if runs != "flash_attention_2" or batch["input_ids"].shape[0] != 1:
            raise RuntimeError(f"expected one flattened row for flash_attention_2 ({runs})")
        record("flash_attention_2, [1, 2L] flattened", model, batch, True)
        unflat = {k: v.reshape(len(micro), -1) for k, v in batch.items()}
        record("flash_attention_2, [2, L] rows (unflattened)", model, unflat, False)
    else:
        why = "skipped: " + ("flash-attn not installed" if cuda else "no CUDA device")
        entries["flash_attention_2"] = {"status": "skipped", "reason": why}
        log(f"isolation flash_attention_2: {why}; probing flash's control flow instead")
        try:
            register_flash_probe()
        except ImportError as exc:  # transformers moved the private helpers it mirrors
            entries["flash probe"] = {"status": "skipped", "reason": f"skipped: {exc}"}
        else:
            model.set_attn_implementation(PROBE)
            batch = make_collator(cfg, tokenizer, attention_implementation(model))(micro)
            record("flash probe, [1, 2L] flattened", model, batch, True)
            unflat = {k: v.reshape(len(micro), -1) for k, v in batch.items()}
            record("flash probe, [2, L] rows (unflattened)", model, unflat, False)
    failed = [name for name, e in entries.items() if e["status"] == "failed"]
    return {
        "status": "failed" if failed else "ok",
        "error": f"not isolated: {', '.join(failed)}" if failed else None,
        "dtype": dtype,
        "seq_len": s.isolation_seq_len,
        "entries": entries,
    }


# ------------------------------------------------ 2 + 3. planner memory and throughput


def planner_prediction(run: Any) -> dict[str, Any]:
    """The planner's per-GPU peak for the run's config at the run's micro-batch.

    `choose_micro_batch` is what train.py's start-up summary calls, but it plans the
    micro-batch it would pick itself (the largest that fits a GPU; 1 with none), so when
    that differs the run's micro-batch is planned with `make_plan(micro_given=True)`.
    """
    from bigft.plan import choose_micro_batch
    from bigft.plan.hardware import GPU
    from bigft.plan.planner import detect_gpu, make_plan, workload_from_config

    cfg, micro = run.cfg, run.layout.micro_batch_size
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"micro_batch_size": micro})})
    world = run.accelerator.num_processes
    _, report = choose_micro_batch(cfg, world)
    note = None
    if report.work.micro_batch != micro:
        note = f"choose_micro_batch planned micro-batch {report.work.micro_batch}, not {micro}"
        gpu = detect_gpu() or GPU("no GPU", 0.0, 1.0, 1.0)
        work = workload_from_config(cfg, gpus_per_node=world, nodes=1)
        report = make_plan(work, gpu, micro_given=True, grad_accum=run.layout.grad_accum)
    b = report.breakdown
    parts = ("params", "grads", "optimizer", "activations", "logits", "buffers")
    return {
        "gpu": report.gpu.name,
        "micro_batch": report.work.micro_batch,
        "predicted_tensor_peak_bytes": b.tensor_peak,
        "predicted_total_bytes": report.total,
        "peak_phase": b.phase,
        "breakdown_bytes": {k: getattr(b, k) for k in parts},
        "planner_note": note,
    }


def attention_flops(step: list[dict[str, Any]], layers: int, q_dim: int) -> float:
    """Causal attention matmul FLOPs (QK^T and AV; backward = 2 x forward) of the packed
    sequences in a step: 6 x layers x q_dim x the sum of squared sequence lengths."""
    total = 0
    for batch in step:
        for pos in batch["position_ids"].tolist():
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            total += sum((b - a) ** 2 for a, b in itertools.pairwise(starts))
    return 6.0 * layers * q_dim * total


def peak_bf16_flops(s: Settings) -> tuple[float | None, str]:
    """(dense bf16 FLOP/s, GPU name) of --gpu or the CUDA device, from the catalogue."""
    import torch

    from bigft.errors import ConfigError
    from bigft.plan.hardware import get_gpu

    name = s.gpu or (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    if name is None:
        return None, "cpu"
    try:
        return get_gpu(name).bf16_tflops * 1e12, name
    except ConfigError:
        return None, f"{name} (not in bigft.plan.hardware: pass --gpu NAME)"


def size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_method(s: Settings, method: str) -> dict[str, Any]:
    """Checks 2 and 3 for one method: warm-up steps, then measured steps of bigft's loop."""
    import torch

    from bigft.loop.step import train_step
    from bigft.model.load import count_parameters
    from bigft.plan.arch import load_arch

    if method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        reason = "skipped: bitsandbytes not installed (pip install 'bigft[quant]')"
        return {"status": "skipped", "reason": reason}
    cuda = torch.cuda.is_available()
    layers = s.full_layers if method == "full" else s.layers
    config = write_run_config(s, method, method, layers)
    log(f"{method}: {layers} layers, seq_len {s.seq_len}, micro-batch {s.micro_batch}")
    with bigft_run(config) as run:
        batches = iter(run.loader)
        for _ in range(s.warmup_steps):  # allocates the optimizer states, warms kernels up
            train_step(run, next_step(run, batches))
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        arch = load_arch(run.cfg.model.name_or_path)
        tokens, attn, losses = 0.0, 0.0, []
        start = time.perf_counter()
        for _ in range(s.steps):
            step = next_step(run, batches)
            stats = train_step(run, step)
            tokens += stats["tokens"]
            attn += attention_flops(step, arch.layers, arch.q_dim)
            losses.append(stats["loss"])
        sync()
        elapsed = time.perf_counter() - start
        measured = torch.cuda.max_memory_allocated() if cuda else None
        reserved = torch.cuda.max_memory_reserved() if cuda else None
        trainable, total = count_parameters(run.accelerator.unwrap_model(run.model))
        memory = planner_prediction(run)
    memory.update(method=method, layers=layers, seq_len=s.seq_len)
    memory["parameters"] = {"trainable": trainable, "total": total}
    memory["summary"] = f"predicted {size(memory['predicted_tensor_peak_bytes'])}"
    memory["summary"] += f" ({size(memory['predicted_total_bytes'])} with overhead)"
    memory["status"] = "ok"
    if measured is not None:
        ratio = measured / memory["predicted_tensor_peak_bytes"]
        memory.update(measured_allocated_bytes=measured, ratio=ratio)
        memory["measured_reserved_bytes"] = reserved
        memory["summary"] += f", measured {size(measured)}, ratio {ratio:.3f}"
        if abs(ratio - 1) > s.memory_tolerance:
            memory["status"] = "failed"
            memory["error"] = f"{memory['summary']}: off by more than {s.memory_tolerance:.0%}"
    else:
        memory.update(measured_allocated_bytes=None, ratio=None)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        memory["summary"] += f", measured n/a: no CUDA (peak RSS {rss:.0f} MiB)"
    # Model FLOPs per token: forward 2N and input gradients 2N over the matmul weights
    # (projections and head; embeddings are lookups), weight gradients 2N only for what
    # trains. Recomputation by checkpointing is not counted (MFU, not HFU).
    matmul = arch.layers * arch.layer_linear_params + arch.vocab * arch.hidden
    per_token = 6.0 * matmul if method == "full" else 4.0 * matmul + 6.0 * trainable
    flops_per_s = (per_token * tokens + attn) / elapsed
    peak, gpu = peak_bf16_flops(s)
    mfu = flops_per_s / peak if peak else None
    throughput = {
        "method": method,
        "status": "ok" if tokens > 0 else "failed",
        "error": None if tokens > 0 else "no token was processed",
        "steps": s.steps,
        "tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "model_flops_per_token": per_token,
        "attention_flops": attn,
        "achieved_tflops": flops_per_s / 1e12,
        "gpu": gpu,
        "peak_bf16_tflops": peak / 1e12 if peak else None,
        "mfu": mfu,
        "loss": losses,
        "summary": f"{tokens / elapsed:,.0f} tokens/s, {flops_per_s / 1e12:.3g} TFLOP/s, "
        + ("MFU n/a" if mfu is None else f"MFU {mfu:.1%} of {gpu}"),
    }
    log(f"{method}: {memory['summary']}; {throughput['summary']}")
    failed = [r["error"] for r in (memory, throughput) if r["status"] == "failed"]
    status = "failed" if failed else "ok"
    return {
        "status": status,
        "error": "; ".join(failed) or None,
        "memory": memory,
        "throughput": throughput,
    }


# ------------------------------------------------- 5. memory and speed options (issue 15)

# The 4090 recipe's method with each memory / speed option of bigft, one run each.
OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "full logits": {"train": {"loss_impl": "full"}},
    "chunked loss": {"train": {"loss_impl": "chunked"}},
    "chunked + offload": {
        "train": {"loss_impl": "chunked"},
        "method": {"offload_activations": True},
    },
    "chunked + tiled MLP": {"train": {"loss_impl": "chunked"}, "method": {"tiled_mlp": True}},
    "chunked + compile": {"train": {"loss_impl": "chunked", "compile": True}},
}


def check_options(s: Settings) -> dict[str, Any]:
    """Peak memory and tokens/s of the QLoRA recipe (LoRA without bitsandbytes) under each
    of `OPTIONS`, the same steps as checks 2 and 3; each entry also gives the planner's
    tensor peak for its config."""
    import torch

    from bigft.loop.step import train_step

    method = "qlora" if importlib.util.find_spec("bitsandbytes") else "lora"
    cuda = torch.cuda.is_available()
    entries: dict[str, Any] = {}
    for name, sections in OPTIONS.items():
        slug = "option-" + name.replace(" ", "-").replace("+", "and")
        config = write_run_config(s, slug, method, s.layers, sections)
        try:
            with bigft_run(config) as run:
                batches = iter(run.loader)
                for _ in range(s.warmup_steps):
                    train_step(run, next_step(run, batches))
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                tokens, start = 0.0, time.perf_counter()
                for _ in range(s.steps):
                    tokens += train_step(run, next_step(run, batches))["tokens"]
                sync()
                elapsed = time.perf_counter() - start
                predicted = planner_prediction(run)["predicted_tensor_peak_bytes"]
                loss = dict(run.loss_info)
            measured = torch.cuda.max_memory_allocated() if cuda else None
            entry = {
                "status": "ok",
                "tokens_per_s": tokens / elapsed,
                "measured_allocated_bytes": measured,
                "predicted_tensor_peak_bytes": predicted,
                "loss_impl": loss.get("loss_impl"),
            }
            entry["summary"] = f"{tokens / elapsed:,.0f} tokens/s, predicted {size(predicted)}"
            entry["summary"] += f", measured {size(measured)}" if measured else ", measured n/a"
        except Exception as exc:  # one option's failure must not hide the others
            traceback.print_exc()
            entry = {"status": "failed", "error": f"{type(exc).__name__}: {exc}".strip()}
        entries[name] = entry
        log(f"options {name}: {entry.get('summary') or entry.get('error')}")
    failed = [f"{n}: {e['error']}" for n, e in entries.items() if e["status"] == "failed"]
    return {
        "status": "failed" if failed else "ok",
        "error": "; ".join(failed) or None,
        "method": method,
        "entries": entries,
    }


# ---------------------------------------------------------------- 4. FSDP2 reduce dtype


@contextmanager
def one_process_group() -> Iterator[None]:
    """A torch.distributed job of one process, described as torchrun would.

    On CPU the shared state is marked multi-device, as bigft's `_cpu_process_group`
    does, so that accelerate applies FSDP at all.
    """
    import torch
    from accelerate.state import AcceleratorState, PartialState

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    AcceleratorState._reset_state(reset_partial_state=True)  # left by earlier checks
    try:
        if not torch.cuda.is_available():
            from accelerate.utils import DistributedType

            PartialState(backend="gloo").distributed_type = DistributedType.MULTI_GPU
        yield
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        AcceleratorState._reset_state(reset_partial_state=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def fsdp_group_dtypes(model: Any) -> tuple[list[str], list[str]]:
    """(reduce dtypes, sharded parameter dtypes) of the trainable parameters, read from
    FSDP2's parameter groups (torch internals): gradients are computed in param_dtype and
    reduced in the group's reduce_dtype, left None when it equals param_dtype."""
    from torch.distributed.fsdp import FSDPModule

    reduce, stored = set(), set()
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        for group in getattr(state, "_fsdp_param_groups", None) or [state._fsdp_param_group]:
            for param in group.fsdp_params if group is not None else []:
                if param.sharded_param.requires_grad:
                    computed = param.param_dtype or param.orig_dtype
                    reduce.add(str(group._reduce_dtype or computed).removeprefix("torch."))
                    stored.add(str(param.orig_dtype).removeprefix("torch."))
    return sorted(reduce), sorted(stored)


def check_fsdp2(s: Settings) -> dict[str, Any]:
    """Check 4: one-process FSDP2 through bigft reduces gradients in float32."""
    import torch

    from bigft.engine.facts import engine_report
    from bigft.loop.step import train_step
    from bigft.losses import loss_sum

    fsdp2 = {"parallel": {"strategy": "fsdp2"}}
    config = write_run_config(s, "fsdp2", "full", s.full_layers, fsdp2)
    log(f"fsdp2: full fine-tuning, {s.full_layers} layers, 1 process")
    with one_process_group(), bigft_run(config) as run:
        batches = iter(run.loader)
        train_step(run, next_step(run, batches))  # FSDP2 sets its groups up lazily
        # One more backward by hand: train_step steps the optimizer and drops the grads.
        summed, _ = loss_sum(run.model, next_step(run, batches)[0])
        run.accelerator.backward(summed)
        sync()
        grads = [p.grad for p in run.model.parameters() if p.grad is not None]
        report = engine_report(run.accelerator, run.model)
        reduce, stored = fsdp_group_dtypes(run.model)
        result: dict[str, Any] = {
            "distributed_type": report["distributed_type"],
            "world_size": report["world_size"],
            "backend": torch.distributed.get_backend(),
            "engine_report_param_dtype": report.get("fsdp_param_dtype"),
            "engine_report_reduce_dtype": report.get("fsdp_reduce_dtype"),
            "group_reduce_dtypes": reduce,
            "sharded_param_dtypes": stored,
            "sharded_grad_dtypes": sorted({str(g.dtype).removeprefix("torch.") for g in grads}),
            "sharded_grads_are_dtensors": bool(grads)
            and all(hasattr(g, "to_local") for g in grads),
        }
        run.optimizer.zero_grad(set_to_none=True)
    expected = "float32"  # bigft's default parallel.fsdp_reduce_dtype (torchtitan's too)
    problems = []
    if result["distributed_type"] != "FSDP":
        problems.append(f"the engine is {result['distributed_type']}, not FSDP")
    if result["engine_report_reduce_dtype"] != expected:
        problems.append(f"engine_report says {result['engine_report_reduce_dtype']}")
    if result["group_reduce_dtypes"] != [expected]:
        problems.append(f"FSDP2's groups reduce in {result['group_reduce_dtypes']}")
    if result["sharded_grad_dtypes"] != [expected]:
        problems.append(f"the sharded gradients are {result['sharded_grad_dtypes']}")
    result["status"] = "failed" if problems else "ok"
    result["error"] = "; ".join(problems) or None
    result["summary"] = (
        f"{result['distributed_type']} x{result['world_size']} ({result['backend']}): groups "
        f"reduce in {','.join(reduce) or '?'} (engine_report {report.get('fsdp_reduce_dtype')}), "
        f"sharded grads {','.join(result['sharded_grad_dtypes']) or 'none'}"
    )
    log(f"fsdp2: {result['summary']}")
    return result


# ----------------------------------------------------------------------------- running


TASKS: dict[str, Callable[[Settings], dict[str, Any]]] = {
    "isolation": check_packed_isolation,
    **{m: (lambda s, m=m: check_method(s, m)) for m in METHODS},
    "fsdp2": check_fsdp2,
    "options": check_options,
}


def run_here(name: str, s: Settings) -> dict[str, Any]:
    """One check in this process; an exception becomes a failed result."""
    import torch

    start = time.perf_counter()
    try:
        result = TASKS[name](s)
    except Exception as exc:  # one check's failure must not stop the others
        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}".strip()}
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return result


def run_child(name: str, s: Settings, timeout: float) -> dict[str, Any]:
    """One check in a child process of its own, killed after `timeout` seconds."""
    out = Path(s.workdir) / f"result-{name}.json"
    out.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--child", name, "--child-out", str(out)]
    try:
        code = subprocess.run([*command, "--settings", json.dumps(asdict(s))], timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timed out after {timeout:.0f} s (--budget-s)"}
    if out.is_file():
        return dict(json.loads(out.read_text()))
    return {"status": "failed", "error": f"the child process exited with code {code.returncode}"}


def report_sections(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One JSON section per check; each method's result feeds planner_memory and
    throughput (both carry the method's status when it stopped before measuring)."""
    methods = {m: results[m] for m in METHODS}
    return {
        "packed_isolation": results["isolation"],
        "planner_memory": {m: r.get("memory", r) for m, r in methods.items()},
        "throughput": {m: r.get("throughput", r) for m, r in methods.items()},
        "fsdp2_reduce_dtype": results["fsdp2"],
        "options": results["options"],
    }


def summary_rows(sections: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    iso = sections["packed_isolation"]
    rows = [(f"packed isolation {n}", e) for n, e in (iso.get("entries") or {"": iso}).items()]
    rows += [(f"planner memory {m}", r) for m, r in sections["planner_memory"].items()]
    rows += [(f"throughput {m}", r) for m, r in sections["throughput"].items()]
    rows.append(("fsdp2 reduce dtype", sections["fsdp2_reduce_dtype"]))
    options = sections["options"]
    return [
        *rows,
        *((f"option {n}", e) for n, e in (options.get("entries") or {"": options}).items()),
    ]


def print_summary(sections: dict[str, Any]) -> None:
    rows = summary_rows(sections)
    width = max(len(label) for label, _ in rows)
    print(f"\n{'check'.ljust(width)}  status   detail")
    for label, r in rows:
        status = r.get("status", "?")
        text = r.get("error") if status == "failed" else r.get("summary") or r.get("reason")
        print(f"{label.strip().ljust(width)}  {status:<7}  {text}")


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "accelerate", "peft", "bitsandbytes", "flash-attn"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--tiny", action="store_true", help="A tiny Llama on the CPU: the smoke run.")
    add("--out", type=Path, help="Also write the results to this JSON file.")
    add("--only", help=f"A comma-separated subset of {','.join(CHECKS)}.")
    add("--gpu", help="GPU name for MFU's peak (default: the CUDA device's name).")
    add("--layers", type=int, help="Layers of the isolation / LoRA / QLoRA model (16).")
    add("--full-layers", type=int, help="Layers for full fine-tuning and FSDP2 (8).")
    add("--seq-len", type=int, help="Tokens per packed row (2048; --tiny 128).")
    add("--micro-batch", type=int, default=2, help="Rows per micro-batch (2).")
    add("--warmup-steps", type=int, help="Unmeasured steps first (2; --tiny 1).")
    add("--steps", type=int, help="Measured optimizer steps (3; --tiny 2).")
    add("--memory-tolerance", type=float, default=0.10, help="Largest |measured/predicted - 1|.")
    add("--budget-s", type=float, default=450.0, help="Checks not started by then are skipped.")
    add("--workdir", help="Keep models and runs here (later runs reuse the models).")
    add("--isolate", action=argparse.BooleanOptionalAction, help="A child process per check.")
    add("--child", help=argparse.SUPPRESS)
    add("--child-out", type=Path, help=argparse.SUPPRESS)
    add("--settings", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace, workdir: str) -> Settings:
    tiny = args.tiny
    return Settings(
        tiny=tiny,
        layers=args.layers or (2 if tiny else 16),
        full_layers=args.full_layers or (2 if tiny else 8),
        seq_len=args.seq_len or (128 if tiny else 2048),
        micro_batch=args.micro_batch,
        warmup_steps=args.warmup_steps or (1 if tiny else 2),
        steps=args.steps or (2 if tiny else 3),
        isolation_seq_len=64 if tiny else 1024,
        memory_tolerance=args.memory_tolerance,
        gpu=args.gpu,
        workdir=workdir,
    )


def main(argv: list[str] | None = None) -> int:
    global START
    args = parse_args(argv)
    if args.child:  # one check, in a child process started by run_child
        result = run_here(args.child, Settings(**json.loads(args.settings)))
        args.child_out.write_text(json.dumps(result, indent=2, default=str))
        return 0
    START = time.time()
    os.environ["BIGFT_GPU_CHECK_T0"] = str(START)
    import torch

    cuda = torch.cuda.is_available()
    only = args.only.split(",") if args.only else list(CHECKS)
    if not set(only) <= set(CHECKS):
        print(f"--only: choose from {','.join(CHECKS)}", file=sys.stderr)
        return 2
    if not (cuda or args.tiny):
        print("no CUDA device: --tiny runs the checks on the CPU", file=sys.stderr)
        return 2
    # The parent never touches CUDA itself (a context would hold GPU memory all along).
    isolate = args.isolate if args.isolate is not None else cuda and not args.tiny
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bigft-gpu-check-") as tmp:
        Path(args.workdir or tmp).mkdir(parents=True, exist_ok=True)
        s = settings_from(args, str(Path(args.workdir or tmp).resolve()))
        log(f"{'child processes' if isolate else 'in-process'}, settings {asdict(s)}")
        for name in CHECKS:
            left = args.budget_s - (time.time() - START)
            if name not in only:
                results[name] = {"status": "skipped", "reason": "not in --only"}
            elif left < 10:
                results[name] = {"status": "skipped", "reason": "skipped: --budget-s spent"}
            else:
                log(f"--- {name}")
                results[name] = run_child(name, s, left) if isolate else run_here(name, s)
            if results[name]["status"] == "failed":
                log(f"{name} FAILED: {results[name].get('error')}")
    sections = report_sections(results)
    failed = [name for name, r in results.items() if r["status"] == "failed"]
    device = next((r["device"] for r in results.values() if "device" in r), "unknown")
    command = shlex.join(
        ["python", "bench/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]
    )
    seconds = round(time.time() - START, 1)
    print_summary(sections)
    print(f"\n{len(failed)} failed ({', '.join(failed) or 'none'}), {seconds} s on {device}")
    print(f"reproduce: {command}")
    if args.out:
        report = {"command": command, "device": device, "versions": versions()}
        report |= {"settings": asdict(s), **sections, "failed": failed, "seconds": seconds}
        args.out.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
