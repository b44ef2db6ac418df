"""The chunked causal-LM loss (bigft.chunked_loss) against the full-logits path.

Every comparison runs the same batch through two copies of one tiny fp32 model, one
prepared with `prepare_loss(..., "chunked", CHUNK)`, and checks the summed loss and every
parameter's gradient. The vocabulary is large next to the hidden size, and CHUNK = 10 does
not divide the 3 x 24 positions of a micro-batch: 8 chunks of 10 and one of 2.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bigft.chunked_loss import HeadLoss, prepare_loss
from bigft.config import TrainConfig
from bigft.errors import ConfigError
from bigft.losses import Batch, count_targets, loss_sum
from tests.helpers import alive_probe

VOCAB, HIDDEN, B, L, CHUNK = 512, 32, 3, 24, 10
N_CHUNKS = -(-B * L // CHUNK)
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
}


def llama(seed: int = 0, **extra: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**COMMON, "tie_word_embeddings": False, **extra})
    return LlamaForCausalLM(config).float()


def qwen2() -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    return Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=False))


def gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, **no_dropout
    )
    config.bos_token_id = config.eos_token_id = 2
    return GPT2LMHeadModel(config)  # lm_head tied to the token embedding


def gemma2() -> Any:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(3)
    config = Gemma2Config(**{**COMMON, "num_key_value_heads": 1}, head_dim=8)
    assert config.final_logit_softcapping is not None
    return Gemma2ForCausalLM(config)


def padded(seed: int = 0, length: int = L) -> Batch:
    """Right-padded rows of different lengths, prompts and padding masked out."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, length), generator=g)
    mask = torch.ones(B, length, dtype=torch.long)
    for row, pad in enumerate((0, 5, 11)):
        if pad:
            ids[row, -pad:], mask[row, -pad:] = 0, 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def packed(seed: int = 0) -> Batch:
    """What the packing collator emits: several sequences per row, position_ids that
    restart at 0, no attention mask, the first label of every sequence -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, L), generator=g)
    bounds = [(0, 9, 24), (0, 5, 13, 24), (0, 24)]
    position_ids = torch.zeros(B, L, dtype=torch.long)
    labels = ids.clone()
    for row, cuts in enumerate(bounds):
        for start, end in itertools.pairwise(cuts):
            position_ids[row, start:end] = torch.arange(end - start)
            labels[row, start] = -100
    return {"input_ids": ids, "position_ids": position_ids, "labels": labels}


def completion_only(seed: int = 0) -> Batch:
    """Prompt tokens (the first 7, 12 and 3 of each row) are not targets."""
    batch = padded(seed)
    for row, prompt in enumerate((7, 12, 3)):
        batch["labels"][row, :prompt] = -100
    return batch


class ChunkCounter:
    """Counts the chunk computations (lm_head matmul + loss) of every installed head."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = HeadLoss.chunk_loss

        def counted(head: HeadLoss, *args: Any) -> Any:
            self.calls += 1
            return real(head, *args)

        monkeypatch.setattr(HeadLoss, "chunk_loss", counted)


def grads(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_grads_match(full: Any, chunked: Any, rel: float = 1e-5) -> None:
    """Every trainable parameter has a gradient in both, equal within `rel` of its norm."""
    want, got = grads(full), grads(chunked)
    assert want.keys() == got.keys() and want
    for name, g in want.items():
        assert g is not None and got[name] is not None, name
        scale = float(g.norm())
        assert scale > 0, f"{name}: no gradient reached it"
        assert float((got[name] - g).norm()) <= rel * scale, name


def compare(
    build: Callable[[], Any],
    batches: list[Batch],
    monkeypatch: pytest.MonkeyPatch,
    teacher: Any = None,
    rel: float = 1e-5,
) -> tuple[Any, Any]:
    """Train-step both ways: each micro-batch's summed loss over the targets of all of
    them (bigft's token-normalised accumulation); returns both models."""
    full = build()
    chunked = copy.deepcopy(full)
    info = prepare_loss(chunked, "chunked", CHUNK)
    assert info == {"loss_impl": "chunked", "loss_chunk": CHUNK}
    counter = ChunkCounter(monkeypatch)
    total = sum(count_targets(b) for b in batches)
    distill = (teacher, 2.0, 0.5) if teacher is not None else (None, 2.0, 0.0)
    for model in (full, chunked):
        losses = []
        for batch in batches:
            summed, targets = loss_sum(model, batch, *distill)
            assert int(targets) == count_targets(batch)
            (summed / total).backward()
            losses.append(summed.detach())
        model.step_losses = torch.stack(losses)
    torch.testing.assert_close(chunked.step_losses, full.step_losses, rtol=1e-6, atol=1e-5)
    assert_grads_match(full, chunked, rel)
    chunks = sum(-(-b["labels"].numel() // CHUNK) for b in batches)
    assert counter.calls == chunks  # each chunk's logits made once: nothing recomputed
    assert info["loss_impl"] == "chunked"  # no fall-back happened on the way
    return full, chunked


def test_padded_rows_with_attention_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    compare(llama, [padded()], monkeypatch)


def test_packed_rows_with_position_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    compare(llama, [packed()], monkeypatch)


def test_completion_only_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    compare(llama, [completion_only()], monkeypatch)


def test_distillation_from_a_teacher(monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = llama(seed=7).eval().requires_grad_(False)
    compare(llama, [completion_only()], monkeypatch, teacher=teacher)


def test_token_normalised_accumulation_over_two_micro_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compare(llama, [padded(0), padded(1, length=17)], monkeypatch)


@pytest.mark.parametrize("build", [lambda: llama(tie_word_embeddings=True), qwen2, gpt2])
def test_tied_embeddings_and_other_architectures(
    build: Callable[[], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    full, _ = compare(build, [packed(3)], monkeypatch)
    if full.config.tie_word_embeddings:
        assert full.get_output_embeddings().weight is full.get_input_embeddings().weight


def test_lora_adapters_get_the_same_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import LoraConfig, get_peft_model

    def build() -> Any:
        # Random B as well as A: with peft's zero B, A's gradient would be 0 either way.
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        return get_peft_model(llama(), lora)

    full, _ = compare(build, [completion_only()], monkeypatch)
    assert all("lora_" in name for name in grads(full))


def test_bf16_model_stays_close(monkeypatch: pytest.MonkeyPatch) -> None:
    model = llama().to(torch.bfloat16)
    chunked = copy.deepcopy(model)
    prepare_loss(chunked, "auto", CHUNK)
    batch = padded()
    want, _ = loss_sum(model, batch)
    got, _ = loss_sum(chunked, batch)
    assert got.dtype == want.dtype == torch.float32  # the CE itself runs in fp32
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-3)
    want.backward()
    got.backward()
    assert_close_in_low_precision(model, chunked)


def assert_close_in_low_precision(full: Any, chunked: Any) -> None:
    for name, g in grads(full).items():
        other = grads(chunked)[name]
        assert other.dtype == g.dtype, name
        cosine = F.cosine_similarity(g.float().flatten(), other.float().flatten(), 0)
        assert float(cosine) > 0.999, name
        assert float((other.float() - g.float()).norm()) <= 0.02 * float(g.float().norm()), name


def test_fp32_weights_under_bf16_autocast_stay_close() -> None:
    """DDP's mixed precision: fp32 master weights, bf16 matmuls under autocast. The head's
    gradients come back in fp32, as autograd gives them through autocast's casts."""
    model = llama()
    chunked = copy.deepcopy(model)
    prepare_loss(chunked, "auto", CHUNK)
    batch = padded()
    for m in (model, chunked):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = loss_sum(m, batch)
        loss.backward()
        m.loss = float(loss.detach())
    assert chunked.loss == pytest.approx(model.loss, rel=1e-3)
    assert chunked.lm_head.weight.grad.dtype == torch.float32
    assert_close_in_low_precision(model, chunked)


def test_a_head_with_a_bias_gets_its_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import PhiConfig, PhiForCausalLM

    def phi() -> Any:
        torch.manual_seed(4)
        config = PhiConfig(**{**COMMON, "num_key_value_heads": 4}, resid_pdrop=0.0)
        config.embd_pdrop = config.attention_dropout = 0.0
        return PhiForCausalLM(config)

    full, _ = compare(phi, [completion_only(2)], monkeypatch)
    assert full.lm_head.bias is not None and "lm_head.bias" in grads(full)


def test_backward_twice_through_one_graph_is_refused() -> None:
    model = llama()
    prepare_loss(model, "chunked", CHUNK)
    loss, _ = loss_sum(model, padded())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()


def test_gemma2_softcapping_falls_back_to_full_with_the_reason() -> None:
    model = gemma2()
    info = prepare_loss(model, "auto", CHUNK)
    assert info["loss_impl"] == "full"
    assert "final_logit_softcapping" in str(info["loss_impl_reason"])
    assert not hasattr(model.get_output_embeddings(), "_bigft_head_loss")
    with pytest.raises(ConfigError, match="chunked cannot apply.*final_logit_softcapping"):
        prepare_loss(model, "chunked", CHUNK)
    batch = padded()
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert float(logits.abs().max()) <= model.config.final_logit_softcapping
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), reduction="sum"
    )
    assert float(loss_sum(model, batch)[0]) == pytest.approx(float(expected), rel=1e-6)


class Rescaled(nn.Module):
    """A causal LM that multiplies its lm_head's output after the call, with no config
    key announcing it: only the run-time identity check can notice."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self.config = copy.copy(inner.config)

    def get_output_embeddings(self) -> nn.Module:
        return self.inner.get_output_embeddings()

    def forward(self, **kwargs: Any) -> Any:
        out = self.inner(**kwargs)
        out.logits = out.logits * 2.0
        return out


def test_a_model_that_transforms_the_head_output_falls_back_for_good() -> None:
    model = Rescaled(llama())
    reference = Rescaled(copy.deepcopy(model.inner))
    info = prepare_loss(model, "auto", CHUNK)
    assert info["loss_impl"] == "chunked"
    batch = padded()
    got, _ = loss_sum(model, batch)
    want, _ = loss_sum(reference, batch)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert info["loss_impl"] == "full" and "transforms" in str(info["loss_impl_reason"])
    head = model.get_output_embeddings()
    assert "forward" not in vars(head) and not hasattr(head, "_bigft_head_loss")


def test_an_engine_hook_that_re_wraps_the_output_keeps_the_chunked_loss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DeepSpeed ZeRO-3 replaces a module's output with `output.detach()` passed through
    an autograd function (its pre-backward hook): same memory, not the same tensor."""

    class PreBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, output: torch.Tensor) -> torch.Tensor:
            return output.detach()

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            return grad

    def build() -> Any:
        model = llama()
        model.lm_head.register_forward_hook(lambda _m, _i, out: PreBackward.apply(out))
        return model

    compare(build, [padded()], monkeypatch)


def test_generation_and_plain_forward_are_untouched() -> None:
    model = llama().eval()
    prepared = copy.deepcopy(model)
    prepare_loss(prepared, "auto", CHUNK)
    batch = padded()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = prepared(**inputs).logits
        assert logits.shape == (B, L, VOCAB)
        torch.testing.assert_close(logits, model(**inputs).logits, rtol=0, atol=0)
        prompt = batch["input_ids"][:1, :6]
        kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(prepared.generate(prompt, **kwargs), model.generate(prompt, **kwargs))
        # Evaluation (no grad) takes the chunked path without checkpointing.
        torch.testing.assert_close(loss_sum(prepared, batch)[0], loss_sum(model, batch)[0])


@pytest.mark.parametrize("impl", ["chunked", "full"])
def test_chunked_path_never_materialises_the_logits(impl: str) -> None:
    model = llama()
    prepare_loss(model, impl, CHUNK)
    probe = alive_probe(
        lambda t: t.numel() // VOCAB if t.dim() >= 2 and t.shape[-1] == VOCAB else None
    )
    with probe:
        loss, _ = loss_sum(model, padded())
        loss.backward()
    if impl == "chunked":
        # One chunk at a time: logits, log-softmax and gradients of <= CHUNK rows each,
        # a few of them alive together, never the B x L rows of the micro-batch.
        assert 0 < probe.largest <= CHUNK
        assert probe.peak <= 4 * CHUNK < B * L
    else:
        assert probe.largest >= B * (L - 1) and probe.peak >= 2 * B * (L - 1)


def test_prepare_loss_choices_and_errors() -> None:
    model = llama()
    assert prepare_loss(model, "full", CHUNK) == {
        "loss_impl": "full",
        "loss_impl_reason": "train.loss_impl is full",
    }
    assert "forward" not in vars(model.lm_head)
    prepare_loss(model, "chunked", CHUNK)
    first = model.lm_head._bigft_head_loss
    prepare_loss(model, "chunked", 4)  # a second call replaces, never stacks, the wrapper
    assert model.lm_head._bigft_head_loss is not first
    assert model.lm_head._bigft_head_loss._forward.__func__ is nn.Linear.forward
    assert first.info["loss_impl"] == "full"
    with pytest.raises(ConfigError, match="unknown 'fused'"):
        prepare_loss(model, "fused", CHUNK)

    from transformers import LlamaConfig, LlamaForSequenceClassification

    classifier = LlamaForSequenceClassification(LlamaConfig(**COMMON, num_labels=3))
    info = prepare_loss(classifier, "auto", CHUNK)
    assert info["loss_impl"] == "full" and "no output embedding" in str(info["loss_impl_reason"])
    with pytest.raises(ConfigError, match="chunked cannot apply: the model has no output"):
        prepare_loss(classifier, "chunked", CHUNK)


def test_a_head_that_is_not_a_plain_linear_is_full(monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    info = prepare_loss(model, "auto", CHUNK)
    assert info["loss_impl"] == "full"
    assert "not a plain torch.nn.Linear" in str(info["loss_impl_reason"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown without CUDA")
def test_liger_without_cuda_says_what_is_missing() -> None:
    missing = r"liger-kernel (is not installed \(pip install 'bigft\[liger\]'\)|needs a CUDA GPU)"
    with pytest.raises(ConfigError, match=missing):
        prepare_loss(llama(), "liger", CHUNK)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_liger_matches_the_full_loss_on_cuda() -> None:
    pytest.importorskip("liger_kernel")
    full = llama().cuda()
    fused = copy.deepcopy(full)
    assert prepare_loss(fused, "liger", CHUNK) == {"loss_impl": "liger"}
    batch = {k: v.cuda() for k, v in completion_only().items()}
    want, _ = loss_sum(full, batch)
    got, _ = loss_sum(fused, batch)
    assert float(got) == pytest.approx(float(want), rel=1e-4)
    want.backward()
    got.backward()
    assert_grads_match(full, fused, rel=1e-3)


def test_the_planner_knows_the_same_logit_transforms() -> None:
    from bigft.chunked_loss import LOGIT_TRANSFORMS
    from bigft.plan import workload

    assert workload.LOGIT_TRANSFORMS == LOGIT_TRANSFORMS


def test_config_fields() -> None:
    train = TrainConfig()
    assert (train.loss_impl, train.loss_chunk) == ("auto", 256)
    with pytest.raises(ValueError, match="greater than 0"):
        TrainConfig(loss_chunk=0)
    with pytest.raises(ValueError, match="'auto', 'chunked', 'full' or 'liger'"):
        TrainConfig(loss_impl="fused")
