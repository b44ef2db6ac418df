"""Activation bytes of a decoder-only transformer step, tensor by tensor.

Every term below is a tensor that autograd saves for backward (or a transient at a peak),
for the Llama-style layer transformers runs (RMSNorm, rotary q/k, sdpa / flash / eager
attention, gated MLP), under the dtype rules in `workload.py`. Sizes are per token unless
noted; `c` is the compute dtype's bytes, `r` the residual stream's. The counts were derived
from the modelling code and checked term by term against the simulator (tests pin them).
"""

from __future__ import annotations

from dataclasses import dataclass

from bigft.plan.workload import Workload


@dataclass
class StepActivations:
    """Activation terms of one step for one micro-batch, in bytes."""

    layer: float  # saved per trainable layer between forward and its backward
    layer_bw: float  # extra when a layer's backward starts (recompute + gradients in flight)
    shared: float  # rotary cos/sin and the mask: alive until the bottom layer is done
    n_layers: int  # layers that keep activations (trainable ones)
    bottom_saving: float  # the bottom trainable layer saves less when its input needs no grad
    base: float  # shared tensors: rotary cos/sin, mask, final norm, lm_head input
    fwd_extra: float  # alive only at the end of forward (autocast weight cache, logits)
    loss_peak: float  # cross-entropy backward: fp32 log-softmax, its gradient, input grad
    head_bw: float  # lm_head backward: logits gradient and the weight gradient's temporary
    head_saved: float  # lm_head's saved input and cached weight, freed after its matmul
    head_wgrad_temp: float  # bf16 weight gradient before its cast to the fp32 .grad

    @property
    def all_layers(self) -> float:
        return self.n_layers * self.layer - self.bottom_saving


def _norm(r: int, h: int, trainable_weight: bool) -> float:
    """RMSNorm: the fp32 input (the residual itself when fp32, else an fp32 copy), the
    rsqrt, and the normalized input the weight's gradient needs."""
    return 4 * h + 4 + ((4 if r == 4 else 2) * h if trainable_weight else 0)


def _linear_inputs(
    work: Workload, d_in: int, names: tuple[str, ...], x_bytes: int, shared: bool
) -> float:
    """Inputs saved by a group of linears reading the same tensor (q/k/v, gate/up, ...).

    `shared`: the input is already saved by someone else (sdpa's output for o_proj).
    """
    cast = work.autocast and x_bytes == 4
    total = 0.0
    if not work.adapters:
        if cast:  # autocast casts the fp32 input once per linear, each keeps its copy
            total += len(names) * 2 * d_in
        elif not shared:
            total += x_bytes * d_in
        return total
    adapted = [n for n in names if n in work.lora_targets]
    a_b = work.adapter_bytes
    for _ in adapted:
        # peft casts x to the adapter dtype, dropout keeps a bool mask, lora_A keeps its
        # input (a bf16 autocast copy of an fp32 tensor), lora_B keeps lora_A's output.
        x_a = a_b if x_bytes != a_b else x_bytes
        if work.lora_dropout > 0:
            total += (4 if work.device == "cpu" else 1) * d_in  # CUDA's mask is bool
        if work.autocast and x_a == 4:
            total += 2 * d_in
        elif work.lora_dropout > 0 or x_a != x_bytes:
            total += x_a * d_in
        total += (2 if work.autocast else a_b) * work.lora_rank
    if adapted and not work.autocast and work.lora_dropout == 0 and a_b == x_bytes and not shared:
        total += x_bytes * d_in  # one shared input for all the group's adapters
    return total


def _attention(work: Workload) -> float:
    """Tensors the attention kernel keeps (q, k, v, output, log-sum-exp, mask copy)."""
    a, c = work.arch, work.compute_bytes
    q, kv, heads, kvh, s = a.q_dim, a.kv_dim, a.heads, a.kv_heads, work.seq_len
    cast = work.autocast and work.residual_bytes == 4  # rotary made q/k fp32
    if work.attn == "flash_attention_2":
        return c * (2 * q + 2 * kv) + 4 * heads
    # sdpa / eager with a mask (packed or padded rows): transformers repeats k and v to
    # every head; a one-head repeat is a view unless a dtype cast materializes it.
    k = q if kvh < heads and (kvh > 1 or cast) else kv
    v = q if 1 < kvh < heads else kv
    if work.attn == "eager":
        scores = (4 + c) * heads * s  # fp32 softmax output and its compute-dtype copy
        return c * (2 * q + k + v) + scores
    return c * (2 * q + k + v) + 4 * heads + c * s  # sdpa converts the bool mask per call


def layer_bytes_per_token(work: Workload, input_needs_grad: bool = True) -> float:
    """Saved activations of one layer without checkpointing, per token (weights apart)."""
    a, c, r = work.arch, work.compute_bytes, work.residual_bytes
    h, i = a.hidden, a.intermediate
    full = not work.adapters
    norms = a.norms_per_layer * _norm(r, h, full)
    if not input_needs_grad:
        norms -= 4 * h + 4
    qkv = _linear_inputs(work, h, ("q_proj", "k_proj", "v_proj"), r, shared=False)
    o = _linear_inputs(work, a.q_dim, ("o_proj",), c, shared=work.attn != "eager")
    gate_up = _linear_inputs(work, h, ("gate_proj", "up_proj"), r, shared=False)
    down = _linear_inputs(work, i, ("down_proj",), c, shared=False)
    mlp = 3 * c * i  # gate output (activation input), activation output, up output
    extra = 0.0
    if work.method == "dora":
        # DoRA keeps the base and the LoRA results of each adapted linear for the
        # magnitude's gradient.
        extra = sum(2 * c * a.linear_shapes()[t][1] for t in work.lora_targets)
    return norms + qkv + _attention(work) + o + gate_up + down + mlp + extra


def step_activations(work: Workload) -> StepActivations:
    """All activation terms of one step for `work` (one micro-batch)."""
    a, c, r = work.arch, work.compute_bytes, work.residual_bytes
    n = work.micro_batch * work.seq_len
    n_shift = work.micro_batch * (work.seq_len - 1)
    h, v = a.hidden, a.vocab
    full = not work.adapters
    cast_weights = work.autocast and work.base_weight_bytes == 4 and full
    weight_cache = 2.0 * a.layer_linear_params if cast_weights else 0.0
    adapter_cache = (
        2.0 * work.adapter_params_per_layer() if work.adapters and work.autocast else 0.0
    )
    per_layer_full = layer_bytes_per_token(work) * n + weight_cache + adapter_cache
    needs_grad = work.method == "full"
    bottom = 0.0 if needs_grad else (4 * h + 4) * n
    if work.adapters and work.lora_dropout > 0:
        # No gradient flows into the bottom layer's input, so the dropouts in front of
        # its q/k/v adapters keep no mask (everything after attention needs grads again).
        mask = 4 if work.device == "cpu" else 1
        qkv = [t for t in work.lora_targets if t in ("q_proj", "k_proj", "v_proj")]
        bottom += mask * n * h * len(qkv)
    dora_temp = _dora_transient(work)
    if work.grad_ckpt:
        layer = float(r * h * n)  # only the layer's input survives the forward
        layer_bw = per_layer_full + _bw_transient(work, n) + dora_temp
        fwd_extra = work.n_trainable_layers * weight_cache
        bottom = 0.0
    else:
        layer = per_layer_full
        layer_bw = _bw_transient(work, n)
        fwd_extra = 0.0
    head_trainable = work.method in ("full", "freeze")
    shared = 2 * a.head_dim * r * n  # rotary cos and sin, shared by every layer
    if work.attn != "flash_attention_2":
        shared += work.micro_batch * work.seq_len**2  # the bool block-diagonal mask
    base = shared + _norm(r, h, head_trainable) * n
    head_saved = 0.0
    if head_trainable:
        head_saved = (2 if cast_weights else r) * h * n
        head_saved += 2.0 * v * h if cast_weights else 0.0  # lm_head's cached bf16 weight
    base += head_saved
    logits = c * v * n
    # The end of forward holds the logits and accelerate's fp32 copy of them; DoRA's
    # weight rebuild peaks earlier, inside the last layer.
    fwd_extra += max(logits + (4 * v * n if work.autocast else 0), dora_temp)
    loss_peak = 12.0 * v * n_shift  # log-softmax output, its gradient, the input gradient
    wgrad_temp = c * v * h if cast_weights and head_trainable else 0.0
    head_bw = logits + wgrad_temp
    return StepActivations(
        layer=layer,
        layer_bw=layer_bw,
        shared=shared,
        n_layers=work.n_trainable_layers,
        bottom_saving=bottom,
        base=base,
        fwd_extra=fwd_extra,
        loss_peak=loss_peak,
        head_bw=head_bw,
        head_saved=head_saved,
        head_wgrad_temp=wgrad_temp,
    )


def _bw_transient(work: Workload, n: int) -> float:
    """Gradients in flight when a layer's backward starts: the residual stream's gradient
    and the MLP's intermediate gradients (with adapters, also their fp32 grad paths)."""
    a, c, r = work.arch, work.compute_bytes, work.residual_bytes
    if work.adapters:
        return (4 * a.hidden + 3 * c * a.intermediate + 4 * a.q_dim) * n
    return (r * a.hidden + c * a.intermediate) * n


def _dora_transient(work: Workload) -> float:
    """DoRA rebuilds each adapted weight to take its column norms: lora_B(lora_A(eye)) in
    fp32 and bf16, the base weight in fp32, their sum; the largest linear sets the peak."""
    if work.method != "dora":
        return 0.0
    shapes = work.arch.linear_shapes()
    return max(
        6.0 * shapes[t][0] ** 2 + 14.0 * shapes[t][0] * shapes[t][1] for t in work.lora_targets
    )
