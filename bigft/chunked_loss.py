"""Causal-LM loss computed inside the lm_head call, a chunk of tokens at a time.

The full path (`bigft.losses`) materialises the B x L x V logits, their fp32 copy, the
log-softmax and its gradient: at Llama-3's vocabulary (128,256) one row of 4,096 tokens
holds ~1 GiB of bf16 logits and ~6 GiB more around the loss. `prepare_loss` replaces the
output embedding's forward on this one module instance; while
`bigft.losses.causal_lm_loss_sum` runs the model, that forward returns the loss in place
of the logits: shape (B, L, 1) in fp32, the batch's summed loss at the first position and
zeros elsewhere. Each chunk's logits are
computed in the model's dtype, cast to fp32 and turned into `bigft.losses.position_losses`
(the full path's own function); under autograd the chunk's gradients are computed right
away (`ChunkedHeadLoss`) and its logits freed, so backward has nothing to recompute.
Models that rescale or cap their logits after the lm_head call (`LOGIT_TRANSFORMS`) keep
the full path.

Why inside the lm_head call: DeepSpeed ZeRO-3 gathers the lm_head weight only while the
module runs (and again for its backward, through hooks on its outputs), and FSDP2
unshards the root module's weights only inside its forward. The loss has to be what the
module returns for both engines to see it.

The labels reach the module through `bigft.losses.HEAD_REQUEST`, a context variable set
by `causal_lm_loss_sum`, not through the model's arguments: the model may be wrapped
(PEFT, DDP, a DeepSpeed engine) and its forward signature is not bigft's. Without a
request (generation, export, a plain forward) the module runs its own forward unchanged.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigft.errors import BigftError, ConfigError
from bigft.losses import HEAD_REQUEST, HeadRequest, add_by_source, position_losses

# Config keys with which transformers rescales or caps the logits after the lm_head call
# (Gemma-2/3, Cohere, Granite): the chunked loss would skip that step.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class HeadLoss:
    """The loss-computing forward installed on one lm_head (an `nn.Linear`).

    `info` is the summary.json record of the loss in effect; `fall_back` restores the
    module's own forward and rewrites `info` in place.
    """

    def __init__(self, module: nn.Linear, impl: str, chunk: int) -> None:
        self.module = module
        self.impl = impl
        self.chunk = chunk
        self.info: dict[str, object] = {"loss_impl": impl}
        if impl == "chunked":
            self.info["loss_chunk"] = chunk
        self._own_forward = "forward" in vars(module)  # an instance forward to restore
        self._forward = module.forward
        module.forward = self.forward  # type: ignore[method-assign, assignment]
        module._bigft_head_loss = self  # type: ignore[assignment]

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The module's forward: (B, L, 1) fp32 losses while `causal_lm_loss_sum` asks
        for them with labels shaped like `hidden`'s positions, the logits otherwise."""
        request = HEAD_REQUEST.get()
        if (
            request is None
            or request.head is not None  # a second call in one forward: not the head's
            or args
            or kwargs
            or hidden.shape[:-1] != request.labels.shape
        ):
            return self._forward(hidden, *args, **kwargs)
        request.head = self
        flat = hidden.reshape(-1, hidden.size(-1))
        labels = request.labels.reshape(-1)
        # Liger returns the sum only: a step whose loss per source is wanted (a logged
        # step of a mixture) is scored by chunks.
        if self.impl == "liger" and request.teacher is None and request.by_source is None:
            losses = self._liger(flat, labels)
        else:
            losses = self._chunked(flat, labels, request)
        output = losses.view(*hidden.shape[:-1], 1)
        request.output = output
        request.version = 0 if output.is_inference() else output._version
        return output

    def _chunked(
        self, hidden: torch.Tensor, labels: torch.Tensor, req: HeadRequest
    ) -> torch.Tensor:
        """The (N,) losses of N positions: their sum at position 0, zeros elsewhere (only
        the sum is differentiable; `causal_lm_loss_sum` reads nothing else)."""
        teacher = req.teacher.reshape(-1, req.teacher.size(-1)) if req.teacher is not None else None
        module = self.module
        total = ChunkedHeadLoss.apply(
            hidden, module.weight, module.bias, labels, teacher, req, self
        )
        rest = torch.zeros(hidden.size(0) - 1, dtype=torch.float32, device=hidden.device)
        return torch.cat([total.reshape(1), rest])

    def chunk_loss(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        teacher: torch.Tensor | None,
        req: HeadRequest,
        with_grad: bool,
        part: slice,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One chunk: its summed loss (fp32) and, `with_grad`, the loss's gradient with
        respect to the chunk's logits (in the logits' dtype, as autograd gives it)."""
        logits = F.linear(hidden, self.module.weight, self.module.bias)
        if not with_grad:
            losses = position_losses(logits, labels, teacher, req.temperature, req.weight)
            self._by_source(req, losses, labels, part)
            return losses.sum(), None
        logits.requires_grad_(True)
        with torch.enable_grad():
            losses = position_losses(logits, labels, teacher, req.temperature, req.weight)
            loss = losses.sum()
            (grad,) = torch.autograd.grad(loss, logits)
        self._by_source(req, losses, labels, part)
        return loss.detach(), grad

    @staticmethod
    def _by_source(
        req: HeadRequest, losses: torch.Tensor, labels: torch.Tensor, part: slice
    ) -> None:
        if req.by_source is not None and req.sources is not None:
            add_by_source(req.by_source, losses, labels, req.sources.reshape(-1)[part])

    def _liger(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Liger's fused linear cross-entropy (its own chunking, gradients computed in
        forward). It returns the batch's sum only: that sum fills the first position and
        every other position is 0, so the output still sums to the loss."""
        if hidden.device.type != "cuda":
            raise BigftError(
                f"train.loss_impl=liger runs on CUDA only; the model is on {hidden.device.type}"
                " (use loss_impl: chunked)"
            )
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        fused = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum")
        total = fused(self.module.weight, hidden, labels, self.module.bias)
        if isinstance(total, tuple):  # versions that can also return the z-loss
            total = total[0]
        rest = torch.zeros(hidden.size(0) - 1, dtype=torch.float32, device=hidden.device)
        return torch.cat([total.float().reshape(1), rest])

    def fall_back(self, reason: str) -> None:
        """Restore the module's own forward for good; `info` records why."""
        if self._own_forward:
            self.module.forward = self._forward  # type: ignore[method-assign]
        else:
            del self.module.forward
        del self.module._bigft_head_loss
        self.info.clear()
        self.info.update({"loss_impl": "full", "loss_impl_reason": reason})


class ChunkedHeadLoss(torch.autograd.Function):
    """The summed loss of `hidden @ weight.T + bias` against `labels`, a chunk of
    positions at a time, gradients computed in forward.

    Each chunk's logits are made once: the chunk's loss and its gradient with respect to
    the logits (`HeadLoss.chunk_loss`) give the hidden rows' gradient (one matmul into
    their slot of a preallocated (N, H) tensor) and the weight's (one `addmm_` into one
    V x H buffer), then the chunk is freed. Backward only scales them by the incoming
    gradient of the sum, a scalar: three lm_head matmuls per position in all, as with
    full logits, instead of recomputing the chunk in backward (four). Without grad
    (evaluation) only the losses are computed.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        teacher: torch.Tensor | None,
        req: HeadRequest,
        head: HeadLoss,
    ) -> torch.Tensor:
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        with_grad = need_hidden or need_weight or need_bias
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias and bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        compute_weight = weight  # in the logits' dtype (autocast computes in bf16/fp16)
        for start in range(0, hidden.size(0), head.chunk):
            part = slice(start, start + head.chunk)
            rows = hidden[part]
            chunk_teacher = None if teacher is None else teacher[part]
            loss, grad = head.chunk_loss(rows, labels[part], chunk_teacher, req, with_grad, part)
            total += loss
            if grad is None:
                continue
            if compute_weight.dtype != grad.dtype:
                compute_weight = weight.to(grad.dtype)
            if grad_hidden is not None:
                grad_hidden[part] = grad @ compute_weight
            if grad_weight is not None:
                if grad_weight.dtype == grad.dtype and rows.dtype == grad.dtype:
                    grad_weight.addmm_(grad.t(), rows)
                else:  # autocast: a low-precision product added to the fp32 gradient
                    grad_weight += grad.t() @ rows.to(grad.dtype)
            if grad_bias is not None:
                grad_bias += grad.sum(0)
            del grad
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if getattr(ctx, "scaled", False):
            raise RuntimeError(
                "the chunked loss's backward runs once (retain_graph is not supported)"
            )
        ctx.scaled = True  # the saved gradients are scaled in place, without a copy
        grads = [None if g is None else g.mul_(grad_total) for g in ctx.saved_tensors]
        return (*grads, None, None, None, None)


def _ineligible(model: Any, head: Any, impl: str) -> str | None:
    """Why the loss cannot run inside this model's head, or None when it can."""
    if head is None:
        return "the model has no output embedding (lm_head)"
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        return f"the lm_head is a {type(head).__name__}, not a plain torch.nn.Linear"
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in LOGIT_TRANSFORMS:
        if getattr(config, key, None) is not None:
            return f"the model's config sets {key}: transformers rescales the lm_head output"
    if impl == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed (pip install 'bigft[liger]')"
        if not torch.cuda.is_available():
            return "liger-kernel needs a CUDA GPU"
    return None


def prepare_loss(model: Any, impl: str, chunk: int) -> dict[str, object]:
    """Install the chunked (or liger) causal-LM loss on `model`'s lm_head, per `impl`
    (train.loss_impl): 'auto' where it applies and the full path otherwise, 'chunked' /
    'liger' or a ConfigError saying why not, 'full' never. `chunk`: token positions per
    chunk (train.loss_chunk; liger chooses its own).

    Call it on the unwrapped model, after PEFT adapters are added and before an engine
    prepares it. Returns the summary.json record, e.g. {"loss_impl": "chunked",
    "loss_chunk": 256} or {"loss_impl": "full", "loss_impl_reason": "..."}; the dict is
    rewritten in place if the model turns out to transform the head's output at the first
    loss (the path then falls back to full for good).
    """
    if impl not in ("auto", "chunked", "full", "liger"):
        raise ConfigError(f"train.loss_impl: unknown '{impl}'; use auto, chunked, full or liger")
    if chunk < 1:
        raise ConfigError(f"train.loss_chunk must be >= 1 (got {chunk})")
    head: Any = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    installed = getattr(head, "_bigft_head_loss", None)
    if installed is not None:
        installed.fall_back("replaced")
    if impl == "full":
        return {"loss_impl": "full", "loss_impl_reason": "train.loss_impl is full"}
    reason = _ineligible(model, head, impl)
    if reason is not None and impl != "auto":
        raise ConfigError(f"train.loss_impl={impl} cannot apply: {reason} (use auto or full)")
    if reason is not None:
        return {"loss_impl": "full", "loss_impl_reason": reason}
    return HeadLoss(head, "chunked" if impl == "auto" else impl, chunk).info
