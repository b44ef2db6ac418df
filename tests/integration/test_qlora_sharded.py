"""QLoRA under ZeRO-3 and FSDP2 on 2 CPU processes (gloo), as the 70B recipe runs it:
4-bit NF4 base stored in bfloat16 (`quant_storage: bfloat16`), bf16 compute, bf16 training.

Each run is checked on numbers, not on its exit code: the engine asked for is the one that
ran (2 processes, parameters sharded in half), the 4-bit layers compute with bitsandbytes
4-bit weights in bf16 storage whose dequantized values are exactly those of the checkpoint
quantized without any engine, the loss falls, both ranks end on the same weights and the
adapter moved, and the exported adapter, loaded with peft on the base (and merged by
`bigft export --merge`), gives the trained model's logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigft.tracking import read_metrics
from tests.helpers import alpaca_rows, torchrun, write_config, write_jsonl

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

pytestmark = pytest.mark.slow

STEPS = 16
# Mean of the first two logged losses minus the mean of the last two; observed 0.39 on
# both engines (4.64 -> 4.19 over 16 steps). Adapters that receive no gradient stay flat.
LOSS_DROP = 0.25
# Training moves the logits of the fixed input by at least ADAPTER_EFFECT (observed 1.06),
# so an export that lost or scrambled the adapter cannot come within ATOL of them.
ADAPTER_EFFECT = 0.5
# Max |logit difference| between the trained model and its exports. Both compute in bf16
# along different paths (DeepSpeed holds the adapters in bf16, peft upcasts a loaded
# adapter to fp32, the merged model holds bf16 sums): observed 0.0039 (one bf16 step at
# these magnitudes) for the adapter and the merged model on both engines.
ATOL = 0.02

WORKER = """
import sys, torch
from contextlib import nullcontext
import bitsandbytes as bnb
from bigft.config_io import load_config
from bigft.loop.setup import setup
from bigft.loop.train import train
from bigft.model.load import count_parameters

def trainable_weights(acc, model):
    named = [(n, p) for n, p in acc.unwrap_model(model).named_parameters() if p.requires_grad]
    gather = nullcontext()
    if any(hasattr(p, "ds_numel") for _, p in named):  # ZeRO-3 partitions
        import deepspeed
        gather = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
    with gather, torch.no_grad():
        return {
            n: (p.full_tensor() if hasattr(p, "full_tensor") else p).float().cpu().clone()
            for n, p in named
        }

def stored_4bit(acc, model):
    # what each rank holds of every 4-bit weight between steps
    held = {}
    for name, module in acc.unwrap_model(model).named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            local = w.ds_tensor if hasattr(w, "ds_tensor") else w  # ZeRO-3 partition
            local = local.to_local() if hasattr(local, "to_local") else local  # FSDP2 shard
            full = getattr(w, "ds_numel", w.numel())
            held[name] = {"dtype": str(local.dtype), "local": local.numel(), "full": full}
    return held

def record_4bit_compute(acc, model, seen):
    # what each 4-bit layer really computes with, inside the engine, at its first forward
    def hook(module, args, output, name):
        if name in seen:
            return
        w = module.weight
        state = w.quant_state
        seen[name] = {
            "type": type(w).__name__,
            "dtype": str(w.dtype),
            "numel": w.numel(),
            "shape": tuple(state.shape),
            "quant_type": state.quant_type,
            "dequantized": bnb.functional.dequantize_4bit(w.data, state).float().cpu(),
        }
    for name, module in acc.unwrap_model(model).named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # prepended: runs before ZeRO-3's hook that releases the gathered weight
            module.register_forward_hook(
                lambda m, a, o, name=name: hook(m, a, o, name), prepend=True
            )

run = setup(load_config(sys.argv[1]))
acc, model = run.accelerator, run.model
before = trainable_weights(acc, model)
held = stored_4bit(acc, model)
counts = count_parameters(acc.unwrap_model(model))
computed = {}
record_4bit_compute(acc, model, computed)
train(run)
after = trainable_weights(acc, model)
text = ["Uppercase.\\nbadcafe\\nBADCAFE", "Uppercase.\\nfacedab\\nFACEDAB"]
ids = torch.tensor([run.tokenizer(t)["input_ids"] for t in text])
model.eval()
with torch.no_grad():
    logits = model(input_ids=ids).logits.float().cpu()
torch.save(
    {
        "world": acc.num_processes,
        "before": before,
        "after": after,
        "held": held,
        "counts": counts,
        "computed": computed,
        "ids": ids,
        "logits": logits,
    },
    f"{sys.argv[2]}/rank{acc.process_index}.pt",
)
acc.wait_for_everyone()
torch.distributed.destroy_process_group()  # no gloo thread left running at exit
"""

ENGINE = {
    "zero3": {"distributed_type": "DEEPSPEED", "zero_stage": 3, "world_size": 2},
    "fsdp2": {"distributed_type": "FSDP", "fsdp_param_dtype": "bfloat16", "world_size": 2},
}


def layer_key(module_name: str) -> str:
    """'layers.0.self_attn.q_proj' from a 4-bit layer's name, peft-wrapped or not."""
    return module_name[module_name.index("layers.") :].removesuffix(".base_layer")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_qlora_bf16_storage_trains_sharded_and_exports(
    strategy: str, tiny_base: Path, tmp_path: Path
) -> None:
    if strategy == "zero3":
        pytest.importorskip("deepspeed")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bigft._compat import disable_bnb_cpu_repack
    from bigft.config_io import load_config
    from bigft.model.export import export_run
    from bigft.model.load import quantization_kwargs

    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(48))
    cfg_path = write_config(
        tmp_path / "cfg.yaml",
        tiny_base,
        data,
        method={
            "name": "qlora",
            "quant": {"compute_dtype": "bfloat16", "quant_storage": "bfloat16"},
            "gradient_checkpointing": "full",
        },
        train={"seq_len": 64, "micro_batch_size": 2, "steps": STEPS, "precision": "bf16"},
        parallel={"strategy": strategy},
    )
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    start = time.monotonic()
    proc = subprocess.run(
        torchrun(worker, str(cfg_path), str(tmp_path)),
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    ranks_said = [line for line in proc.stderr.splitlines() if line.startswith("[rank")]
    assert proc.returncode == 0, "\n".join(ranks_said[-40:]) or proc.stderr[-4000:]
    print(f"{strategy}: 2-process run {time.monotonic() - start:.1f} s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())

    # the engine asked for ran on 2 processes, each holding half of the parameters
    assert [r["world"] for r in ranks] == [2, 2]
    for key, value in ENGINE[strategy].items():
        assert summary["engine"][key] == value, (key, summary["engine"])
    assert summary["engine"]["param_fraction_local"] == 0.5, summary["engine"]

    # 4-bit weights: stored as bf16, sharded in half between the ranks...
    base_4bit = AutoModelForCausalLM.from_pretrained(
        tiny_base, dtype=torch.bfloat16, **quantization_kwargs(load_config(cfg_path).method.quant)
    )
    # as in every bigft run: on a CPU with AVX512-BF16, bitsandbytes would otherwise
    # repack the weights in place at the first forward (no dequantizing after that)
    disable_bnb_cpu_repack(base_4bit)
    reference = {
        layer_key(name): module.weight
        for name, module in base_4bit.named_modules()
        if type(module).__name__ == "Linear4bit"
    }
    assert len(reference) == 2 * 7
    for rank in ranks:
        held = {layer_key(n): v for n, v in rank["held"].items()}
        assert held.keys() == reference.keys()
        for name, facts in held.items():
            assert facts["dtype"] == "torch.bfloat16", (name, facts)
            assert facts["local"] * 2 == facts["full"], (name, facts)
    # ...and what each layer computed with inside the engine is that checkpoint's NF4
    # quantization, bit for bit (no engine cast or reordered the packed bytes)
    from bitsandbytes.functional import dequantize_4bit

    computed = {layer_key(n): v for n, v in ranks[0]["computed"].items()}
    assert computed.keys() == reference.keys()
    for name, weight in reference.items():
        seen = computed[name]
        rows, cols = seen["shape"]
        assert (seen["type"], seen["dtype"], seen["quant_type"]) == (
            "Params4bit",
            "torch.bfloat16",
            "nf4",
        ), (name, seen)
        assert seen["numel"] * 4 == rows * cols  # four 4-bit values per bf16 element
        expected = dequantize_4bit(weight.data, weight.quant_state).float()
        assert torch.equal(seen["dequantized"], expected), name

    # the loss falls
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == STEPS
    drop = (losses[0] + losses[1]) / 2 - (losses[-2] + losses[-1]) / 2
    print(f"{strategy}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, drop {drop:.3f}")
    assert drop >= LOSS_DROP, losses

    # both ranks end on the same weights (all of them, 4-bit included), every adapter
    # tensor moved, and the ranks computed the same logits
    digests = summary["weights_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    before, after = ranks[0]["before"], ranks[0]["after"]
    assert after.keys() == ranks[1]["after"].keys() == before.keys()
    assert len(after) == 2 * 2 * 7 and all("lora_" in n for n in after)
    for name in after:
        assert torch.equal(after[name], ranks[1]["after"][name]), name
        assert not torch.equal(after[name], before[name]), name
    trained = ranks[0]["logits"]
    assert torch.equal(trained, ranks[1]["logits"])

    # the parameter counts bigft reports see the whole model under the engine, each
    # 4-bit weight counted by the values it packs
    base_numel = sum(t.numel() for t in load_file(tiny_base / "model.safetensors").values())
    lora_numel = sum(t.numel() for t in after.values())
    assert [r["counts"] for r in ranks] == [(lora_numel, base_numel + lora_numel)] * 2

    # the exported adapter, loaded with peft on the 4-bit base, computes the trained logits
    ids = ranks[0]["ids"]
    final = out / "final"
    with torch.no_grad():
        untrained = base_4bit(input_ids=ids).logits.float()
        loaded = PeftModel.from_pretrained(base_4bit, final).eval()
        adapted = loaded(input_ids=ids).logits.float()
    effect, adapter_err = max_diff(untrained, trained), max_diff(adapted, trained)
    print(f"{strategy}: logits moved {effect:.3f} by training; adapter export {adapter_err:.4f}")
    assert effect > ADAPTER_EFFECT
    assert adapter_err <= ATOL

    # bigft export --merge: dequantized base + adapter as one plain model
    merged_dir = export_run(out, tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any("Linear4bit" in type(m).__name__ for m in merged.modules())
    with torch.no_grad():
        merged_err = max_diff(merged(input_ids=ids).logits, trained)
    print(f"{strategy}: merged export {merged_err:.4f}")
    assert merged_err <= ATOL
