"""Analytic per-GPU memory of one training step: instant, no torch.

Model states follow the ZeRO paper's accounting (Rajbhandari et al. 2020, section 3):
Ψ parameters in mixed precision with Adam hold 2Ψ (bf16 weights) + 2Ψ (bf16 gradients)
+ KΨ (fp32 master weights, momentum, variance; K = 12), partitioned over N data-parallel
GPUs by stage. Each engine's real layout is then accounted for as it runs (fp32 weights and
autocast under DDP, FSDP2's fp32 shards and bf16 unsharded layers, foreach-AdamW's
temporary, DDP's gradient buckets).

Activations are counted tensor by tensor for one decoder layer, with the same dtype rules
the simulator runs (see `layers.py`), and the step is cut into the same phases as the
simulator: forward+loss, the top layer's backward, the bottom layer's backward, and the
optimizer step. The step's peak is the largest phase.

Activation offload (method.offload_activations) moves the checkpointed layers' inputs to
pinned host memory, all but `layers.OFFLOAD_IN_FLIGHT` of them; they are counted in
`cpu_bytes` beside ZeRO's offloaded states. A tiled MLP (method.tiled_mlp) keeps one
tile's intermediates at a time. torch.compile (train.compile) is assumed to change
nothing: no measurement says otherwise yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from bigft.plan import layers
from bigft.plan.workload import Workload

GIB = 1024**3
COMPONENTS = ("params", "grads", "optimizer", "activations", "logits", "buffers")


def zero_model_states(psi: float, n_gpus: int, stage: int, k: int = 12) -> float:
    """Per-GPU model-state bytes of mixed-precision Adam under ZeRO stage 0-3 (paper Fig. 1)."""
    if stage == 0:
        return (2 + 2 + k) * psi
    if stage == 1:
        return 2 * psi + 2 * psi + k * psi / n_gpus
    if stage == 2:
        return 2 * psi + (2 + k) * psi / n_gpus
    return (2 + 2 + k) * psi / n_gpus


@dataclass
class ModelStates:
    """Per-GPU bytes of weights, gradients, optimizer states and the engine's buffers."""

    params: float
    grads: float
    optimizer: float
    opt_step_temp: float  # transient of optimizer.step() (foreach temporaries, fp32 grads)
    buffers: float  # persistent engine buffers (DDP buckets, ZeRO reduce buckets)
    gathered_layer: float  # unsharded weights + grads of the layer in flight (ZeRO-3/FSDP2)
    gathered_head: float  # same for the embedding / lm_head group during the loss
    cpu_bytes: float = 0.0  # host memory per GPU (offload)


def _optimizer_bytes(work: Workload, n: float, param_bytes: float) -> float:
    """Optimizer state bytes for `n` trainable parameters stored in `param_bytes`."""
    a = work.arch
    if work.optimizer == "adamw":
        return 2 * param_bytes * n
    if work.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        return 2.0 * n + 2 * 4 * n / 2048  # 8-bit m and v, fp32 absmax per 2048-block
    if work.optimizer == "adafactor":
        # Factored second moment: one row and one column vector per matrix (no momentum).
        return 4.0 * n * (1 / a.hidden + 1 / max(a.intermediate, a.hidden))
    return param_bytes * n  # sgd: the momentum buffer


def model_states(work: Workload) -> ModelStates:
    """Weights, gradients and optimizer states on one GPU for the workload's layout; with
    `reference_copy` (task preference, full fine-tuning) the weights include a frozen copy
    of the model in the compute dtype, partitioned like the policy under ZeRO-3 / FSDP2."""
    states = _policy_states(work)
    if work.reference_copy:
        sharded = work.strategy in ("zero3", "zero3-offload", "fsdp2")
        per_param = 4.0 if work.precision == "fp32" else 2.0
        copy = work.arch.n_params * per_param / (work.world_size if sharded else 1)
        states = replace(states, params=states.params + copy)
    return states


def _policy_states(work: Workload) -> ModelStates:
    """Weights, gradients and optimizer states on one GPU for the workload's layout."""
    a, world, stage = work.arch, work.world_size, work.zero_stage
    n_t = float(work.trainable_params)
    train_b = work.trainable_weight_bytes
    frozen = work.base_param_bytes() - (0.0 if work.adapters else n_t * work.stored_frozen_bytes)
    params = frozen + n_t * train_b
    # Bytes of the layer an engine gathers (unsharded bf16 weights; NF4 stays packed),
    # plus its trainable parameters' gradients before they are reduced and resharded.
    layer_t = work.adapter_params_per_layer() if work.adapters else a.layer_params
    layer_w = a.layer_params * (2.0 if work.method != "qlora" else 0.6) + 2.0 * layer_t
    head_w = 2.0 * (a.head_params or a.embed_params)
    adamw = work.optimizer == "adamw"
    small_temp = _opt_temp_small(work)
    if work.strategy == "ddp":
        grads = n_t * train_b
        opt = _optimizer_bytes(work, n_t, train_b)
        temp = train_b * n_t if adamw else small_temp  # foreach AdamW's sqrt(v) copy
        buckets = grads if world > 1 else 0.0  # DDP copies gradients into its buckets
        return ModelStates(params, grads, opt, temp, buckets, 0.0, 0.0)
    if work.strategy == "fsdp2":
        # fp32 shards of everything trainable; the layer in flight and the prefetched one
        # unsharded in bf16; the root group (embeddings, lm_head) unsharded for the step.
        shard = (n_t * 4 + frozen) / world
        opt = _optimizer_bytes(work, n_t, 4) / world
        temp = 4 * n_t / world if adamw else small_temp
        # Gradients are reduced in fp32: each layer's bf16 gradients get an fp32 copy.
        in_flight = 2 * layer_w + 4.0 * layer_t
        return ModelStates(shard, 4 * n_t / world, opt, temp, 0.0, in_flight, head_w)
    # DeepSpeed ZeRO: a bf16 module; fp32 master weights and the optimizer's states are
    # the K bytes per parameter the paper partitions (K = 12 for Adam).
    master = (4 + _optimizer_bytes(work, 1, 4)) * n_t / world
    half = frozen + 2.0 * n_t
    bucket = 2 * 2.0 * (work.reduce_bucket or a.hidden**2)  # double-buffered reduce bucket
    fp32_grads = 4 * n_t / world  # the fp32 gradient partition the optimizer steps on
    if stage in (1, 2):
        grads = 2.0 * n_t / (world if stage == 2 else 1)
        return ModelStates(half, grads, master, fp32_grads, bucket, 0.0, 0.0)
    gathered = layer_w + 2 * 0.9 * a.hidden**2  # layer in flight + the prefetch bucket
    if work.strategy == "zero3-offload":
        cpu = (half + 2.0 * n_t) / world + master
        return ModelStates(0.0, 0.0, 0.0, 0.0, bucket, gathered, head_w, cpu_bytes=cpu)
    return ModelStates(half / world, 2 * n_t / world, master, fp32_grads, bucket, gathered, head_w)


def _opt_temp_small(work: Workload) -> float:
    """Per-parameter optimizers (bnb 8-bit, Adafactor) need a temporary of the largest
    parameter only; SGD without momentum updates in place."""
    if work.optimizer == "sgd":
        return 0.0
    a = work.arch
    largest = max(a.embed_params, a.hidden * a.intermediate) if not work.adapters else 0
    return 2 * 4.0 * largest


@dataclass
class Breakdown:
    """Per-GPU bytes at the step's peak, by component, and the total of each phase."""

    params: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    buffers: float
    phase: str
    phases: dict[str, float] = field(default_factory=dict)
    cpu_bytes: float = 0.0  # host memory per GPU: ZeRO offload states + offloaded activations
    offloaded_activations: float = 0.0  # the activations' share of cpu_bytes (pinned)

    @property
    def tensor_peak(self) -> float:
        return sum(getattr(self, c) for c in COMPONENTS)


def phase_breakdowns(work: Workload) -> dict[str, dict[str, float]]:
    """Each phase's bytes by component; the same phases the simulator measures."""
    a = work.arch
    ms = model_states(work)
    act = layers.step_activations(work)
    n_t = max(float(work.trainable_params), 1.0)
    per_param_grad = ms.grads / n_t
    layer_t = a.layer_params if not work.adapters else work.adapter_params_per_layer()
    g_layer = per_param_grad * layer_t
    head_t = (
        (a.head_params or a.embed_params) + a.hidden if work.method in ("full", "freeze") else 0
    )
    g_head = per_param_grad * head_t
    g_first = per_param_grad * (a.hidden * a.intermediate if not work.adapters else 0)
    embed_trains = work.method == "full" or (work.method == "freeze" and not work.freeze_embeddings)
    g_rest = per_param_grad * max(n_t - layer_t - (a.embed_params if embed_trains else 0), 0)
    gl = ms.gathered_layer
    t_end = work.residual_bytes * a.hidden * work.micro_batch * work.seq_len
    fixed = {"params": ms.params, "optimizer": ms.optimizer, "buffers": ms.buffers}
    saved = act.all_layers + act.base

    def phase(grads: float, acts: float, logits: float, gathered: float) -> dict[str, float]:
        return {
            **fixed,
            "grads": grads,
            "activations": acts,
            "logits": logits,
            "buffers": ms.buffers + gathered,
        }

    return {
        # End of forward: every layer's activations, the autocast weight cache, logits.
        "forward": phase(0.0, saved, act.fwd_extra, ms.gathered_head),
        # Loss backward, then lm_head backward (its weight gradient appears).
        "loss": phase(0.0, saved, act.loss_peak, ms.gathered_head),
        # lm_head's matmul backward (logits gradient in, bf16 weight gradient out), then
        # its fp32 weight gradient once the matmul's saved tensors are released.
        "lm_head": max(
            phase(0.0, saved, act.head_bw, ms.gathered_head),
            phase(g_head, saved - act.head_saved, act.head_wgrad_temp, ms.gathered_head),
            key=lambda p: sum(p.values()),
        ),
        # Top layer's backward, as it starts (its down-projection gradient is made while
        # all its activations are alive) and as it ends (its gradients all exist).
        "top": max(
            phase(g_head + g_first, act.all_layers + act.shared + act.layer_bw, 0.0, gl),
            phase(g_head + g_layer, act.all_layers - act.layer + act.shared + t_end, 0.0, gl),
            key=lambda p: sum(p.values()),
        ),
        # Bottom layer's backward: the layers above already hold gradients.
        "post": max(
            phase(
                g_rest + g_first,
                act.below_bottom + act.bottom_layer + act.shared + act.bottom_bw,
                0.0,
                gl,
            ),
            phase(g_rest + g_layer, act.below_bottom + act.shared + t_end, 0.0, gl),
            key=lambda p: sum(p.values()),
        ),
        # The step's temporaries (foreach AdamW's sqrt(v), fp32 gradient partitions) are
        # counted with the optimizer, as MemTracker files them.
        "opt": {
            **phase(ms.grads, act.leftover, 0.0, 0.0),
            "optimizer": ms.optimizer + ms.opt_step_temp,
        },
    }


def analytic(work: Workload) -> Breakdown:
    """Per-GPU peak tensor memory of one steady-state training step."""
    phases = phase_breakdowns(work)
    totals = {k: sum(v.values()) for k, v in phases.items()}
    peak = max(totals, key=lambda k: totals[k])
    host = layers.step_activations(work).host
    return Breakdown(
        **{c: phases[peak][c] for c in COMPONENTS},
        phase=peak,
        phases=totals,
        cpu_bytes=model_states(work).cpu_bytes + host,
        offloaded_activations=host,
    )
