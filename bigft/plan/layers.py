"""Activation bytes of a decoder-only transformer step, tensor by tensor.

Every term below is a tensor that autograd saves for backward (or a transient at a peak),
for the Llama-style layer transformers runs (RMSNorm, rotary q/k, sdpa / flash / eager
attention, gated MLP), under the dtype rules in `workload.py`. Sizes are per token unless
noted. What decides them is the dtype each tensor arrives in:

- the residual stream is fp32 when the weights it comes from are (r = 4), else bf16;
- under autocast a linear casts an fp32 input (a copy per linear) and returns bf16; a
  4-bit bitsandbytes linear returns its input's dtype; without autocast, the weights'.

The counts were derived from the modelling code and are pinned by tests against the
simulator and against real steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from bigft.plan.workload import Workload

# Checkpointed layer inputs an offloading step keeps on the GPU: the one being copied out
# (or prefetched back for backward) and the one in use.
OFFLOAD_IN_FLIGHT = 2


@dataclass
class StepActivations:
    """Activation terms of one step for one micro-batch, in bytes."""

    all_layers: float  # saved by every active layer between forward and its backward
    layer: float  # saved by the top layer (the first to run backward)
    layer_bw: float  # extra when a layer's backward starts (recompute + gradients in flight)
    bottom_layer: float  # saved by the bottom active layer (the last to run backward)
    bottom_bw: float  # extra when the bottom layer's backward starts
    below_bottom: float  # frozen layers in the graph under the bottom trainable one
    leftover: float  # kept after backward, into the optimizer step
    shared: float  # rotary cos/sin and the mask: alive until the bottom layer is done
    bottom_saving: float  # the bottom layer saves less when its input needs no grad
    base: float  # shared + final norm and lm_head inputs
    fwd_extra: float  # alive only at the end of forward (autocast weight cache, logits)
    loss_peak: float  # cross-entropy backward: fp32 log-softmax, its gradient, input grad
    head_bw: float  # lm_head backward: logits gradient and the weight gradient's temporary
    head_saved: float  # lm_head's saved input and weight copy, freed after its matmul
    head_wgrad_temp: float  # bf16 weight gradient before its cast to the fp32 .grad
    host: float = 0.0  # checkpointed layer inputs offloaded to pinned host memory


def _norm(r: int, h: int, trainable_weight: bool) -> float:
    """RMSNorm: the fp32 input (the residual itself when fp32, else an fp32 copy), the
    rsqrt, and the normalized input the weight's gradient needs."""
    return 4 * h + 4 + ((4 if r == 4 else 2) * h if trainable_weight else 0)


def _out_bytes(work: Workload, x_bytes: int) -> int:
    """dtype bytes a base linear returns for an input of `x_bytes`."""
    if work.method == "qlora":
        return x_bytes  # bitsandbytes computes in bf16 and casts back to the input dtype
    return 2 if work.autocast else work.compute_bytes


def _linear_inputs(
    work: Workload,
    d_in: int,
    names: tuple[str, ...],
    x_bytes: int,
    shared: bool,
    frozen: bool = False,
) -> float:
    """Per-token bytes saved for a group of linears reading one tensor (q/k/v, gate/up,
    o, down). `shared`: the input is already saved by someone else (sdpa's output).
    `frozen`: a frozen layer without adapters, whose linears keep no input."""
    total = 0.0
    if frozen:
        return total
    if not work.adapters:
        if work.autocast and x_bytes == 4:  # autocast casts fp32 per linear; each keeps it
            total += len(names) * 2 * d_in
        elif not shared:
            total += x_bytes * d_in
        return total
    a_b = work.adapter_bytes
    adapted = [n for n in names if n in work.lora_targets]
    for _ in adapted:
        # peft casts x to the adapter dtype; dropout keeps a mask (bool on CUDA, fp32 on
        # CPU); lora_A keeps its input (autocast's bf16 copy of an fp32 one); lora_B keeps
        # lora_A's output.
        x_a = a_b if x_bytes != a_b else x_bytes
        if work.lora_dropout > 0:
            total += (4 if work.device == "cpu" else 1) * d_in
        if work.autocast and x_a == 4:
            total += 2 * d_in
        elif work.lora_dropout > 0 or x_a != x_bytes:
            total += x_a * d_in
        total += (2 if work.autocast else a_b) * work.lora_rank
    if adapted and not work.autocast and work.lora_dropout == 0 and a_b == x_bytes and not shared:
        total += x_bytes * d_in  # one shared input for all the group's adapters
    return total


def _attention(work: Workload, qkv_bytes: int) -> float:
    """Tensors the attention kernel keeps (q, k, v, output, log-sum-exp, mask copy)."""
    a, r = work.arch, work.residual_bytes
    q, kv, heads, kvh, s = a.q_dim, a.kv_dim, a.heads, a.kv_heads, work.seq_len
    rope = max(qkv_bytes, r)  # q and k after rotary (cos/sin come in the residual's dtype)
    att = 2 if work.autocast else rope  # autocast runs attention in bf16
    if work.attn == "flash_attention_2":
        return att * (2 * q + 2 * kv) + 4 * heads
    # sdpa / eager with a mask (packed or padded rows): transformers repeats k and v to
    # every head; a one-head repeat is a view unless a dtype cast materializes it.
    k = q if kvh < heads and (kvh > 1 or rope != att) else kv
    v = q if kvh < heads and (kvh > 1 or qkv_bytes != att) else kv
    if work.attn == "eager":
        scores = (4 + att) * heads * s  # fp32 softmax output and its compute-dtype copy
        return att * (2 * q + k + v) + scores
    return att * (2 * q + k + v) + 4 * heads + att * s  # sdpa converts the mask per call


def _normed_bytes(work: Workload, frozen: bool) -> int:
    """dtype bytes of a norm's output: the promotion of its weight's and the residual's."""
    full = not work.adapters and not frozen
    norm_w = work.trainable_weight_bytes if full else work.frozen_weight_bytes
    return int(max(norm_w, work.residual_bytes))


def layer_bytes_per_token(work: Workload, frozen: bool = False) -> float:
    """Saved activations of one layer without checkpointing, per token (weights apart).

    `frozen`: one of freeze's frozen layers (no adapters, weights in their frozen dtype)
    inside the graph of the workload. A norm's output has the promoted dtype of its weight
    and the residual stream (an fp32 weight makes it fp32)."""
    a, r = work.arch, work.residual_bytes
    h = a.hidden
    full = not work.adapters and not frozen
    x = _normed_bytes(work, frozen)  # the normalized input of q/k/v and gate/up
    qkv_out = _out_bytes(work, x)
    att_out = 2 if work.autocast else max(qkv_out, r)
    mlp_out = _out_bytes(work, x)  # gate / up outputs, and the down projection's input
    total = a.norms_per_layer * _norm(r, h, full)
    qkv = ("q_proj", "k_proj", "v_proj")
    total += _linear_inputs(work, h, qkv, x, shared=False, frozen=frozen)
    total += _attention(work, qkv_out)
    o_shared = work.attn != "eager"
    total += _linear_inputs(work, a.q_dim, ("o_proj",), att_out, o_shared, frozen)
    if work.method == "dora" and not frozen:
        # DoRA keeps the base and LoRA results of each adapted linear for the magnitude.
        attn = ("q_proj", "k_proj", "v_proj", "o_proj")
        shapes = a.linear_shapes()
        total += sum(2 * mlp_out * shapes[t][1] for t in work.lora_targets if t in attn)
    if work.mlp_tiles > 1:
        # The tiles run under checkpointing: the layer keeps only the MLP's input (the
        # tiles are views of it); a tile's intermediates live only while it runs.
        return total + x * h
    return total + mlp_bytes_per_token(work, frozen)


def mlp_bytes_per_token(work: Workload, frozen: bool = False) -> float:
    """What the untiled MLP saves per token: its linears' inputs, the gate output (the
    activation's input), the activation's output and the up output (DoRA: also each
    adapted linear's base and LoRA results)."""
    a = work.arch
    h, i = a.hidden, a.intermediate
    x = _normed_bytes(work, frozen)
    mlp_out = _out_bytes(work, x)
    total = _linear_inputs(work, h, ("gate_proj", "up_proj"), x, shared=False, frozen=frozen)
    total += _linear_inputs(work, i, ("down_proj",), mlp_out, shared=False, frozen=frozen)
    total += 3 * mlp_out * i
    if work.method == "dora" and not frozen:
        mlp = ("gate_proj", "up_proj", "down_proj")
        shapes = a.linear_shapes()
        total += sum(2 * mlp_out * shapes[t][1] for t in work.lora_targets if t in mlp)
    return total


def step_activations(work: Workload) -> StepActivations:
    """All activation terms of one step for `work` (one micro-batch)."""
    a, c, r = work.arch, work.compute_bytes, work.residual_bytes
    n = work.micro_batch * work.seq_len
    h, v = a.hidden, a.head_outputs
    # Autocast's bf16 copies of fp32 weights: cached for trainable weights, saved by each
    # matmul for frozen ones (they give the input's gradient). 4-bit weights have none.
    fp32_frozen = work.autocast and work.frozen_weight_bytes == 4 and work.method != "qlora"
    fp32_trained = work.autocast and work.trainable_weight_bytes == 4 and not work.adapters
    frozen_copy = 2.0 * a.layer_linear_params if fp32_frozen else 0.0
    trained_copy = 2.0 * a.layer_linear_params if fp32_trained else 0.0
    weight_copy = frozen_copy if work.adapters else trained_copy
    adapter_copy = 2.0 * work.adapter_params_per_layer() if work.adapters and work.autocast else 0
    full_layer = layer_bytes_per_token(work) * n + weight_copy + adapter_copy
    ckpt_layer = float(r * h * n)  # a checkpointed layer keeps only its input
    n_active = work.n_active_layers
    first_trainable = a.layers - work.n_trainable_layers
    # Frozen layers in the graph (freeze with trainable embeddings) keep what a frozen
    # base layer keeps: no inputs for weight gradients.
    frozen_layer = layer_bytes_per_token(work, frozen=True) * n + frozen_copy

    def saved(i: int) -> float:
        if work.grad_ckpt and i % work.ckpt_every == 0:
            return 0.0 if work.offload_activations else ckpt_layer
        return full_layer if i >= first_trainable else frozen_layer

    def on_gpu(first: int, end: int) -> float:
        """Bytes layers first..end-1 keep on the GPU; offloaded inputs still in flight."""
        ckpts = sum(1 for i in range(first, end) if work.grad_ckpt and i % work.ckpt_every == 0)
        flight = min(OFFLOAD_IN_FLIGHT, ckpts) if work.offload_activations else 0
        return sum(saved(i) for i in range(first, end)) + flight * ckpt_layer

    all_layers = on_gpu(a.layers - n_active, a.layers)
    below_bottom = on_gpu(a.layers - n_active, first_trainable)
    top_is_ckpt = work.grad_ckpt and (a.layers - 1) % work.ckpt_every == 0
    dora_temp = _dora_transient(work)
    bw = _bw_transient(work, n)
    # The bottom active layer's input needs no gradient unless the embeddings train or
    # checkpointing made it (enable_input_require_grads): its first norm and q/k/v keep less.
    bottom = 0.0
    needs_grad = work.method == "full" or (work.method == "freeze" and not work.freeze_embeddings)
    bottom_ckpt = work.grad_ckpt and first_trainable % work.ckpt_every == 0
    if not needs_grad and not work.grad_ckpt:
        bottom = (4 * h + 4) * n
        if work.adapters and work.lora_dropout > 0:
            qkv = [t for t in work.lora_targets if t in ("q_proj", "k_proj", "v_proj")]
            bottom += (4 if work.device == "cpu" else 1) * n * h * len(qkv)
        if fp32_frozen and work.adapters:
            bottom += 2.0 * h * (a.q_dim + 2 * a.kv_dim)  # frozen q/k/v keep no weight copy
    head_trainable = work.method in ("full", "freeze")
    head_w = work.trainable_weight_bytes if head_trainable else work.frozen_weight_bytes
    fp32_head = work.autocast and head_w == 4
    shared = 2 * a.head_dim * r * n  # rotary cos and sin, shared by every layer
    if work.attn != "flash_attention_2":
        shared += work.micro_batch * work.seq_len**2  # the bool block-diagonal mask
    head_saved = 0.0
    if head_trainable:
        x = max(head_w, r)  # the final norm's output (its weight trains with the head)
        head_saved = (2 if work.autocast and x == 4 else x) * h * n
    if fp32_head:
        head_saved += 2.0 * v * h  # lm_head's bf16 weight copy (cached, or kept for backward)
    base = shared + _norm(r, h, head_trainable) * n + head_saved
    cache = work.n_ckpt_layers * weight_copy if work.method in ("full", "freeze") else 0.0
    wgrad_temp = c * v * h if fp32_head and head_trainable else 0.0
    fwd_loss, loss_peak, head_bw, wgrad_temp = _loss_terms(work, wgrad_temp, head_trainable, head_w)
    # DoRA's weight rebuild peaks earlier, inside the last layer.
    fwd_extra = cache + max(fwd_loss, dora_temp)
    return StepActivations(
        all_layers=all_layers - bottom,
        layer=ckpt_layer if top_is_ckpt else full_layer,
        layer_bw=bw + (full_layer + dora_temp if top_is_ckpt else 0.0),
        bottom_layer=ckpt_layer if bottom_ckpt else full_layer - bottom,
        below_bottom=below_bottom,
        # With frozen embeddings, checkpointing makes their output a leaf that requires
        # grad (enable_input_require_grads): it and its .grad live on through the step.
        leftover=2.0 * r * h * n if work.grad_ckpt and not needs_grad else 0.0,
        bottom_bw=bw + (full_layer + dora_temp if bottom_ckpt else 0.0),
        shared=shared,
        bottom_saving=bottom,
        base=base,
        fwd_extra=fwd_extra,
        loss_peak=loss_peak,
        head_bw=head_bw,
        head_saved=head_saved,
        head_wgrad_temp=wgrad_temp,
        host=work.n_ckpt_layers * ckpt_layer if work.offload_activations else 0.0,
    )


def _loss_terms(
    work: Workload, wgrad_temp: float, head_trainable: bool, head_w: float
) -> tuple[float, float, float, float]:
    """Bytes the loss adds at the end of forward, in the loss's backward and in lm_head's
    backward (`fwd_extra`, `loss_peak`, `head_bw` before the checkpointing cache), and
    the weight gradient's temporary once lm_head's .grad exists (`head_wgrad_temp`).

    Full path: the micro-batch's logits and, under autocast, accelerate's fp32 copy of
    them; then the fp32 log-softmax, its gradient and the input gradient over the shifted
    tokens (a sequence head's: over the pooled row); then the logits' gradient and the
    weight gradient's temporary. A sequence head's logits are B x L x num_labels.

    Chunked (bigft.chunked_loss, `loss_rows` positions at a time): everything happens in
    the head's forward. One chunk at a time holds its logits, their fp32 copy, the fp32
    log-softmax and its gradient; the hidden states' gradient (N x H) and, for a head
    that trains, its weight gradient (V x H, the weight's dtype; under autocast with a
    bf16 product of each chunk beside it) are kept from the first chunk to backward, which
    only scales them. A chunk peaks in its loss's gradient: logits, fp32 log-softmax,
    the fp32 gradient flowing into it and the one it returns.
    """
    a = work.arch
    v, h, c = a.head_outputs, a.hidden, work.compute_bytes
    n = work.micro_batch * work.seq_len
    logit_b = 2 if work.autocast else c
    if work.loss_path == "full":
        logits = logit_b * v * n
        fwd = logits + (4 * v * n if work.autocast else 0)
        # A sequence head scores every position, then its loss reads one per row (pooled).
        scored = work.seq_len - 1 if a.num_labels is None else 1
        loss = 12.0 * v * work.micro_batch * scored
        return fwd, loss, logits + wgrad_temp, wgrad_temp
    rows = work.loss_rows
    # Forward: the logits, their fp32 log-softmax (and, below fp32, the fp32 copy it is
    # taken of, freed with it); the chunk's backward adds the gradients of both (fp32).
    chunk = (logit_b + 12) * v * rows
    kept = work.residual_bytes * h * n + (head_w * v * h if head_trainable else 0.0)
    product = 2.0 * v * h if head_trainable and work.autocast and head_w != 2 else 0.0
    return chunk + product + kept, kept, kept, 0.0


def _bw_transient(work: Workload, n: int) -> float:
    """Gradients in flight when a layer's backward starts: the residual stream's gradient
    and the MLP's intermediate gradients (with adapters, also their fp32 grad paths)."""
    a, r = work.arch, work.residual_bytes
    mlp = _out_bytes(work, r)
    if work.adapters:
        rest, intermediate = 4 * a.hidden + 4 * a.q_dim, 3 * mlp * a.intermediate
    else:
        rest, intermediate = r * a.hidden, mlp * a.intermediate
    if work.mlp_tiles == 1:
        return (rest + intermediate) * n
    # Tiled: one tile's intermediates, recomputed, and their gradients at a time.
    tile = work.mlp_tile_fraction * n
    return rest * n + (intermediate + mlp_bytes_per_token(work)) * tile


def _dora_transient(work: Workload) -> float:
    """DoRA rebuilds each adapted weight to take its column norms: lora_B(lora_A(eye)) in
    fp32 and bf16, the base weight in fp32, their sum; the largest linear sets the peak."""
    if work.method != "dora":
        return 0.0
    shapes = work.arch.linear_shapes()
    return max(
        6.0 * shapes[t][0] ** 2 + 14.0 * shapes[t][0] * shapes[t][1] for t in work.lora_targets
    )
