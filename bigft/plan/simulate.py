"""`bigft plan --simulate`: run one real training step under FakeTensorMode and measure it.

The real transformers model (built from the config, no weights), the real peft adapters
and the real torch optimizer run one step on fake tensors while
`torch.distributed._tools.mem_tracker.MemTracker` records every storage's lifetime: exact
tensor memory with no GPU and no RAM. Fake tensors live on the CPU, so bf16 autocast is
CPU autocast (same lower-precision list for linear / matmul / sdpa).

To stay fast at 70B+ the step runs at two or three shallow depths and each phase's peak is
extrapolated linearly to the real depth. The step is cut into phases whose tensor sets
grow by a fixed amount per extra layer: everything up to the top layer's backward (every
other layer still holds activations), each middle layer's backward (layers above hold
gradients, layers below activations), and the bottom layer's backward, the embedding and
the optimizer step (every other layer holds gradients). Each phase's peak is therefore
exactly linear in depth, and the step's peak is the largest extrapolated phase.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field, replace
from typing import Any

from bigft.plan.instruments import nf4_linear_class, phase_tracker
from bigft.plan.workload import Workload

Snap = dict[str, float]
KEYS = ("params", "grads", "optimizer", "activations", "buffers")
# The analytic phase (memory.phase_breakdowns) each simulated phase corresponds to.
TWIN = {"head": "loss", "top": "top", "mid": "top", "post": "post", "opt": "opt"}


@dataclass
class SimResult:
    """Per-phase peak snapshots (bytes by category) of one simulated step."""

    peak: Snap
    phases: dict[str, Snap]
    layers_simulated: list[int]
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.peak[k] for k in KEYS)


def _category(ref: Any) -> str:
    name = str(getattr(ref, "name", ref)).upper()
    if name in ("PARAM", "BUFFER"):
        return "params"
    if name == "GRAD":
        return "grads"
    if name == "OPT":
        return "optimizer"
    return "activations"  # ACT, TEMP, OTH (logits, loss, recomputation)


def _snap(tracker: Any) -> Snap:
    out = dict.fromkeys(KEYS, 0.0)
    for dev_snap in tracker.get_tracker_snapshot("peak").values():
        for ref, nbytes in dev_snap.items():
            if ref != "Total":
                out[_category(ref)] += nbytes
    return out


def _apply_method(model: Any, work: Workload, n_frozen: int) -> Any:
    import torch

    if work.method == "qlora":
        cls = nf4_linear_class()
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        setattr(parent, name, cls(child))
    if work.adapters:
        from peft import LoraConfig, get_peft_model

        peft_cfg = LoraConfig(
            r=work.lora_rank,
            lora_alpha=2 * work.lora_rank,
            lora_dropout=work.lora_dropout,
            target_modules=list(work.lora_targets),
            use_dora=work.method == "dora",
        )
        model = get_peft_model(model, peft_cfg)
        for name, p in model.named_parameters():
            if "lora_" in name:  # peft upcasts adapters to fp32; DeepSpeed bf16 does not
                p.data = p.data.to(torch.float32 if work.adapter_bytes == 4 else torch.bfloat16)
        return model
    if work.method == "freeze":
        model.get_input_embeddings().requires_grad_(not work.freeze_embeddings)
        for layer in model.model.layers[:n_frozen]:
            layer.requires_grad_(False)
        # bigft.model.methods.apply_precision_layout: what trains keeps its own dtype (fp32
        # master weights under autocast), the frozen rest stays in the load dtype.
        dtype = torch.float32 if work.trainable_weight_bytes == 4 else torch.bfloat16
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(dtype)
    return model


def _build(work: Workload, spec: Any, dtype: Any, n_frozen: int, fake: bool) -> Any:
    """The model with its method applied: on real CPU tensors, or on the meta device for a
    fake run (peft's dtype moves cannot swap fake parameters in place, so the model is
    built on meta outside FakeTensorMode and made fake afterwards)."""
    import torch

    from bigft.plan.arch import build_model

    attn = "sdpa" if work.attn == "flash_attention_2" else work.attn
    with torch.device("meta") if fake else contextlib.nullcontext():
        model = _apply_method(build_model(spec, dtype, attn), work, n_frozen)
    if work.tiled_mlp:
        from bigft.model.tiled_mlp import apply_tiled_mlp

        apply_tiled_mlp(model, work.tiled_mlp_shards)
    return model


def _optimizer(model: Any, work: Workload) -> Any:
    import torch

    from bigft.optim import param_groups

    groups = param_groups(model, 0.0)
    # foreach is torch's default on CUDA; on CPU it must be asked for.
    if work.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=1e-5, foreach=True)
    if work.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=1e-5, momentum=0.9, foreach=True)
    if work.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=1e-2, foreach=True)
    # bitsandbytes' 8-bit states need its kernels and real data: the step runs without
    # states and `_apply_layout` adds them analytically.
    return torch.optim.SGD(groups, lr=1e-5, foreach=True)


def _layers(model: Any) -> Any:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model.layers


def simulate_depth(
    work: Workload, n_trainable: int, n_frozen: int = 0, fake: bool = True, device: str = "cpu"
) -> dict[str, Snap]:
    """Run one steady-state step at a shallow depth; return each phase's peak snapshot.

    Phases: 'head' (forward, loss, backward down to the top layer), 'top' (the top
    trainable layer's backward), 'mid' (the layer below it, when there are three or more),
    'post' (bottom layer's backward, embedding, end of backward) and 'opt' (clipping,
    optimizer step, zero_grad). `fake=False` runs the same step on real CPU tensors: the
    measurement the simulation is validated against (small models only), on `device`
    ("cuda" in tests/gpu, where torch.cuda.max_memory_allocated is read beside it).
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.autograd.graph import register_multi_grad_hook

    from bigft.chunked_loss import prepare_loss
    from bigft.losses import loss_sum

    spec = work.arch.with_layers(n_frozen + n_trainable)
    dtype = torch.float32 if work.frozen_weight_bytes == 4 else torch.bfloat16  # load dtype
    B, S = work.micro_batch, work.seq_len
    phases: dict[str, Snap] = {}
    model = _build(work, spec, dtype, n_frozen, fake)
    # The loss training runs (bigft.chunked_loss); liger's kernel needs CUDA, so its
    # chunking is simulated by bigft's chunked loss at liger's chunk size.
    impl = "chunked" if work.loss_path == "liger" else work.loss_path
    prepare_loss(model, impl, work.loss_rows)
    with FakeTensorMode() if fake else contextlib.nullcontext():
        if fake:
            model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device="cpu"))
        else:
            model.to(device)
        if work.grad_ckpt:  # as bigft.model.methods.apply_checkpointing does it
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            base.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False},
                every_n_layers=work.ckpt_every,
            )
            base.enable_input_require_grads()
        model.train()
        if work.autocast:
            # What Accelerator.prepare does for mixed precision: autocast around forward
            # only (the loss runs outside it), outputs converted to fp32.
            from accelerate.utils import convert_outputs_to_fp32

            kind = "cpu" if fake else torch.device(device).type
            forward = torch.autocast(kind, dtype=torch.bfloat16)(model.forward)
            model.forward = convert_outputs_to_fp32(forward)
        opt = _optimizer(model, work)
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:  # steady state: optimizer states exist before the step
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        where = "cpu" if fake else device
        batch = {"input_ids": torch.randint(0, spec.vocab, (B, S), device=where)}
        batch["labels"] = batch["input_ids"].clone()
        pos = torch.arange(S, device=where)
        if work.attn == "flash_attention_2":
            # flash-attn is CUDA-only; sdpa without a mask has its memory footprint (q, k,
            # v, output and log-sum-exp saved, no expanded k/v, no S x S mask).
            batch["position_ids"] = pos.expand(B, S).contiguous()
        else:
            # Packed rows (two documents per row): the block-diagonal mask path a real
            # packed or padded batch takes.
            batch["position_ids"] = (pos - (pos >= S // 2) * (S // 2)).expand(B, S).contiguous()

        tracker = phase_tracker()
        tracker.track_external(model, opt)
        layers = list(_layers(model))[n_frozen:]
        hooks: list[Any] = []

        def on_layer_output(index: int) -> Any:
            def hook(_module: Any, _args: Any, output: Any) -> None:
                out = output[0] if isinstance(output, tuple) else output
                if not torch.is_grad_enabled() or not out.requires_grad or in_backward:
                    return
                hooks.append(register_multi_grad_hook([out], lambda _g: phase(index), mode="any"))

            return hook

        in_backward = False
        order: list[int] = []

        def phase(index: int) -> None:
            # Backward reached trainable layer `index`: close the phase that just ended
            # (the forward and loss head, or the backward of the layer above).
            phases["head" if not order else f"layer{order[-1]}"] = _snap(tracker)
            order.append(index)
            tracker.reset_peak()

        handles = [
            layer.register_forward_hook(on_layer_output(i)) for i, layer in enumerate(layers)
        ]
        with tracker:
            loss, _ = loss_sum(model, batch)
            in_backward = True
            loss.backward()
            phases["post"] = _snap(tracker)
        for handle in [*handles, *hooks]:
            handle.remove()
        tracker.reset_mod_stats()
        with tracker:
            torch.nn.utils.clip_grad_norm_(trainable, 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
        phases["opt"] = _snap(tracker)
    # The last phase covers the bottom layer's backward and what follows it.
    out: dict[str, Snap] = {}
    for key, snap in phases.items():
        name = "top" if key == f"layer{len(layers) - 1}" else key
        name = "mid" if name.startswith("layer") else name
        if name not in out or sum(snap.values()) > sum(out[name].values()):
            out[name] = snap
    return out


def _lin(base: Snap, *terms: tuple[float, Snap]) -> Snap:
    """base + sum(k * snap) per category."""
    out = dict(base)
    for k, snap in terms:
        for key in KEYS:
            out[key] = out.get(key, 0.0) + k * snap.get(key, 0.0)
    return out


def _diff(a: Snap, b: Snap) -> Snap:
    return {k: a.get(k, 0.0) - b.get(k, 0.0) for k in KEYS}


def _extrapolate(
    runs: dict[tuple[int, int], dict[str, Snap]], f: int, t: int, f0: int, t0: int, unit: int
) -> dict[str, Snap]:
    """Phase peaks at (f frozen, t trainable) layers from shallow runs around (f0, t0),
    growing by `unit` layers (k when every k-th layer is checkpointed)."""
    base = runs[(f0, t0)]
    zero = dict.fromkeys(KEYS, 0.0)
    d_f = {p: _diff(runs[(f0 + unit, t0)][p], base[p]) for p in base} if f > f0 else {}
    d_t = {p: _diff(runs[(f0, t0 + unit)][p], base[p]) for p in base} if t > t0 else {}
    steps_t, steps_f = (t - t0) / unit, (f - f0) / unit
    out = {p: _lin(base[p], (steps_t, d_t.get(p, zero)), (steps_f, d_f.get(p, zero))) for p in base}
    if unit == 1 and t >= 3 and "mid" in runs.get((f0, t0 + 1), {}):
        # A middle layer j (j layers below it, t-1-j above) sees j layers of activations
        # ('top' grows by those) and t-1-j layers of gradients ('post' grows by those).
        grow_act, grow_grad = d_t["top"], d_t["post"]
        mid3 = runs[(f0, t0 + 1)]["mid"]
        base_mid = _lin(mid3, (-1, grow_act), (-1, grow_grad), (steps_f, d_f.get("mid", zero)))
        ends = [_lin(base_mid, (j, grow_act), (t - 1 - j, grow_grad)) for j in (1, t - 2)]
        out["mid"] = max(ends, key=lambda s: sum(s.values()))
    return out


def _apply_layout(work: Workload, phases: dict[str, Snap]) -> dict[str, Snap]:
    """Turn one process's measured step into one GPU's share under the workload's layout.

    The simulation runs a single process, so what depends on the other ranks is taken
    from the analytic model: DDP's gradient buckets; for ZeRO and FSDP2, the partitioned
    weights, gradients and optimizer states and the gathered layers (the measured
    activations are kept; the simulated step already computes in bf16 as those engines do).
    """
    from bigft.plan.memory import model_states, phase_breakdowns

    ms = model_states(work)
    out: dict[str, Snap] = {}
    if work.strategy == "ddp":
        # 8-bit optimizers ran as plain SGD (no states): add their states.
        states = ms.optimizer if work.optimizer.endswith("8bit") else 0.0
        for name, snap in phases.items():
            out[name] = {**snap, "buffers": ms.buffers, "optimizer": snap["optimizer"] + states}
        return out
    analytic = phase_breakdowns(work)
    for name, snap in phases.items():
        model = analytic[TWIN[name]]
        out[name] = {k: model[k] for k in ("params", "grads", "optimizer", "buffers")}
        out[name]["activations"] = snap["activations"]
    return out


def _apply_offload(work: Workload, phases: dict[str, Snap]) -> dict[str, Snap]:
    """Activation offload, subtracted analytically: the step ran without the offload hooks
    (they copy to pinned host memory, which fake tensors on the CPU cannot show), so each
    phase loses what the analytic model says the hooks move out of its twin phase."""
    if not work.offload_activations:
        return phases
    from bigft.plan.memory import phase_breakdowns

    kept = phase_breakdowns(work)
    moved = phase_breakdowns(work.with_(offload_activations=False))
    out = {}
    for name, snap in phases.items():
        twin = TWIN[name]
        gone = moved[twin]["activations"] - kept[twin]["activations"]
        out[name] = {**snap, "activations": max(snap["activations"] - gone, 0.0)}
    return out


def simulate(work: Workload, full_depth: bool = False) -> SimResult:
    """Simulate one training step of `work` and return its per-phase peaks.

    By default the step runs at 2 and 3 layers (units of k layers when every k-th layer
    is checkpointed; a third run for `freeze`, whose frozen layers grow separately) and is
    extrapolated to the real depth; `full_depth` runs the real depth once (tens of seconds
    for 7B, minutes for 70B).
    """
    start = time.perf_counter()
    head = work.arch.num_labels  # the simulator builds causal LMs: an upper bound
    if head is not None:
        work = work.with_(arch=replace(work.arch, num_labels=None), loss_impl="auto")
    total_t = work.n_trainable_layers
    total_f = work.arch.layers - total_t
    # Depths grow in units of the checkpointing period, so every run has the same pattern
    # of checkpointed layers (0, k, 2k, ...).
    unit = work.ckpt_every if work.grad_ckpt else 1
    f0 = unit if total_f else 0
    t0 = min(2 * unit, total_t)
    if full_depth or total_t < t0 + unit or (total_f and total_f < f0 + unit):
        phases = simulate_depth(work, total_t, total_f)
        depths = [total_t + total_f]
    else:
        wanted = [(f0, t0), (f0, t0 + unit)]
        if total_f > f0:
            wanted.append((f0 + unit, t0))
        runs = {(f, t): simulate_depth(work, t, f) for f, t in wanted}
        phases = _extrapolate(runs, total_f, total_t, f0, t0, unit)
        depths = sorted({f + t for f, t in wanted})
    phases = _apply_offload(work, _apply_layout(work, phases))
    peak = max(phases.values(), key=lambda s: sum(s.values()))
    notes = [f"simulated with the LM head, not the {head}-output sequence head"] if head else []
    if work.lora_dropout > 0 and work.device != "cpu":
        notes.append(
            "CPU dropout keeps fp32 masks where CUDA keeps bool ones: the simulation "
            "counts 3 extra bytes per adapter input element"
        )
    if work.optimizer.endswith("8bit"):
        notes.append("8-bit optimizer states are analytic (bitsandbytes kernels need CUDA)")
    if work.offload_activations:
        notes.append("activation offload is analytic: the host copies are subtracted")
    if work.loss_path == "liger":
        notes.append("liger's kernel needs CUDA: its loss ran as bigft's chunked loss")
    if work.strategy != "ddp" or work.world_size > 1:
        notes.append("one process simulated; sharded states and engine buffers are analytic")
    return SimResult(
        peak=copy.deepcopy(peak),
        phases=phases,
        layers_simulated=depths,
        seconds=time.perf_counter() - start,
        notes=notes,
    )
