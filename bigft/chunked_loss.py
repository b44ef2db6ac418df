"""Causal-LM loss computed inside the lm_head call, a chunk of tokens at a time.

The full path (`bigft.losses`) materialises the B x L x V logits, their fp32 copy, the
log-softmax and its gradient: at Llama-3's vocabulary (128,256) one row of 4,096 tokens
holds ~1 GiB of bf16 logits and ~6 GiB more around the loss. `prepare_loss` replaces the
output embedding's forward on this one module instance; while
`bigft.losses.causal_lm_loss_sum` runs the model, that forward returns the loss of each
position, shape (B, L, 1) in fp32, instead of the logits. Each chunk's logits are
computed in the model's dtype, cast to fp32 and turned into `bigft.losses.position_losses`
(the full path's own function); under autograd a chunk runs inside non-reentrant
activation checkpointing, so its logits are freed after forward and recomputed in
backward, one chunk at a time. Models that rescale or cap their logits after the lm_head
call (`LOGIT_TRANSFORMS`) keep the full path.

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
from torch.utils.checkpoint import checkpoint

from bigft.errors import BigftError, ConfigError
from bigft.losses import HEAD_REQUEST, HeadRequest, position_losses

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
        if self.impl == "liger" and request.teacher is None:
            losses = self._liger(flat, labels)
        else:
            losses = self._chunked(flat, labels, request)
        output = losses.view(*hidden.shape[:-1], 1)
        request.output = output
        request.version = 0 if output.is_inference() else output._version
        return output

    def _chunk_losses(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        teacher: torch.Tensor | None,
        temperature: float,
        weight: float,
    ) -> torch.Tensor:
        logits = F.linear(hidden, self.module.weight, self.module.bias)
        return position_losses(logits, labels, teacher, temperature, weight)

    def _chunked(
        self, hidden: torch.Tensor, labels: torch.Tensor, req: HeadRequest
    ) -> torch.Tensor:
        teacher = req.teacher.reshape(-1, req.teacher.size(-1)) if req.teacher is not None else None
        losses = []
        for start in range(0, hidden.size(0), self.chunk):
            part = slice(start, start + self.chunk)
            args = (hidden[part], labels[part], None if teacher is None else teacher[part])
            if torch.is_grad_enabled():
                # The chunk's function has no randomness: no RNG state to stash and restore.
                losses.append(
                    checkpoint(
                        self._chunk_losses,
                        *args,
                        req.temperature,
                        req.weight,
                        use_reentrant=False,
                        preserve_rng_state=False,
                    )
                )
            else:
                losses.append(self._chunk_losses(*args, req.temperature, req.weight))
        return torch.cat(losses)

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
            return "liger-kernel is not installed (pip install liger-kernel)"
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
