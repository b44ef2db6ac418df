"""Activation offload (bigft.model.offload): what checkpointing saves for each layer's
recompute goes to host memory and comes back for backward, numerically unchanged."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from bigft.config import MethodConfig
from bigft.losses import loss_sum
from bigft.model.methods import apply_checkpointing
from bigft.model.offload import ActivationOffload, offload_checkpointed_inputs

VOCAB, HIDDEN, LAYERS, HEAD_DIM, B, L = 128, 32, 3, 8, 2, 24  # fp32


def llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HIDDEN // HEAD_DIM,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (B, L), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone()}


def checkpointed(every_k: int | None = None) -> Any:
    model = llama()
    mode = "every_k" if every_k else "full"
    apply_checkpointing(
        model, MethodConfig(gradient_checkpointing=mode, checkpoint_every_k=every_k)
    )
    model.train()
    return model


def step(model: Any) -> float:
    loss, _ = loss_sum(model, batch())
    loss.backward()
    return float(loss.detach())


@pytest.mark.parametrize("every_k", [None, 2])
def test_offloaded_checkpointing_gives_identical_loss_and_gradients(every_k: int | None) -> None:
    plain = checkpointed(every_k)
    offloaded = copy.deepcopy(plain)
    offload = ActivationOffload(min_bytes=0)
    layers = offload_checkpointed_inputs(offloaded, offload)
    assert layers == (LAYERS if every_k is None else -(-LAYERS // every_k))

    packed: list[torch.Size] = []
    real_pack = offload.pack

    def recording_pack(tensor: torch.Tensor) -> Any:
        packed.append(tensor.shape)
        return real_pack(tensor)

    offload.pack = recording_pack  # type: ignore[method-assign]
    assert step(offloaded) == step(plain)
    for (name, p), q in zip(plain.named_parameters(), offloaded.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    # Per checkpointed layer its hidden-state input, the one input that needs a gradient
    # (the rotary cos / sin are kept by the call itself), all of them at once in host
    # memory by the end of forward.
    assert packed == [torch.Size([B, L, HIDDEN])] * layers
    assert offload.peak_host_bytes == layers * B * L * HIDDEN * 4
    assert offload.host_bytes == 0 and offload.tensors == 0  # all brought back


def test_small_tensors_stay_on_the_device() -> None:
    model = checkpointed()
    offload = ActivationOffload()  # 64 KiB: this model's activations are all smaller
    offload_checkpointed_inputs(model, offload)
    step(model)
    assert offload.peak_host_bytes == 0


def test_apply_checkpointing_offloads_only_with_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = MethodConfig(gradient_checkpointing="full", offload_activations=True)
    model = llama()
    apply_checkpointing(model, cfg)
    assert not hasattr(model, "_bigft_offload")  # the CPU holds the activations already

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = llama()
    apply_checkpointing(model, cfg)
    offload = model._bigft_offload
    offload.min_bytes = 0
    monkeypatch.undo()
    step(model)  # CPU tensors take the host-copy path of the same hooks
    assert offload.peak_host_bytes > 0 and offload.host_bytes == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offload_on_cuda_frees_device_memory_and_keeps_gradients() -> None:
    plain = checkpointed().cuda()
    offloaded = copy.deepcopy(plain)
    offload = ActivationOffload(min_bytes=0)
    offload_checkpointed_inputs(offloaded, offload)
    ids = torch.randint(3, VOCAB, (8, 64), device="cuda")
    peaks, losses = [], []
    for model in (plain, offloaded):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loss, _ = loss_sum(model, {"input_ids": ids, "labels": ids.clone()})
        loss.backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
        losses.append(float(loss.detach()))
    assert losses[0] == losses[1]
    for p, q in zip(plain.parameters(), offloaded.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    assert offload.peak_host_bytes > 0 and offload.host_bytes == 0
