"""task contrastive's pure pieces: the InfoNCE sum on hand-computed numbers, filler and
prompt rows, the metrics on embeddings with known answers, and the tiny CLIP builder."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bigft.config import ContrastiveConfig
from bigft.contrastive import (
    FILLER,
    class_prompts,
    contrastive_eval_loss,
    contrastive_loss_sum,
    logit_scale,
    retrieval_metrics,
    zero_shot_accuracy,
)

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class Fixed(torch.nn.Module):
    """A stand-in for CLIPModel: row i of pixel_values / input_ids[:, 0] picks row i of
    learnable image / text tables, returned unnormalized (the loss must normalize)."""

    def __init__(self, image: list[list[float]], text: list[list[float]], scale: float) -> None:
        super().__init__()
        self.image = torch.nn.Parameter(torch.tensor(image))
        self.text = torch.nn.Parameter(torch.tensor(text))
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(scale)))

    def forward(self, input_ids, attention_mask, pixel_values):  # type: ignore[no-untyped-def]
        return SimpleNamespace(
            image_embeds=self.image[pixel_values], text_embeds=self.text[input_ids[:, 0]]
        )


def batch(images: list[int], texts: list[int], labels: list[int]) -> dict[str, torch.Tensor]:
    ids = torch.tensor(texts)[:, None]
    return {
        "pixel_values": torch.tensor(images),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.tensor(labels),
    }


def ce(logits: list[float], target: int) -> float:
    return math.log(sum(math.exp(x) for x in logits)) - logits[target]


def unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


IMAGES = [[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]
TEXTS = [[0.6, 0.8], [0.8, -0.6], [-1.0, 2.0]]


def hand_infonce(images: list[list[float]], texts: list[list[float]], s: float) -> list[float]:
    """Each row's 0.5 x (CE(image_i -> texts) + CE(text_i -> images)) from the formula."""
    img, txt = [unit(v) for v in images], [unit(v) for v in texts]
    return [
        0.5 * (ce([s * dot(img[i], t) for t in txt], i) + ce([s * dot(txt[i], m) for m in img], i))
        for i in range(len(img))
    ]


def test_loss_is_symmetric_infonce_summed_over_rows() -> None:
    model = Fixed(IMAGES, TEXTS, scale=2.0)
    loss, rows = contrastive_loss_sum(
        model, batch([0, 1, 2], [0, 1, 2], [-1] * 3), ContrastiveConfig()
    )
    assert rows == 3
    expected = sum(hand_infonce(IMAGES, TEXTS, 2.0))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
    # closed form: orthogonal pairs, each CE is log(e^s + e^0) - s = log(1 + e^-s)
    pairs = Fixed([[3.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 2.0]], scale=2.0)
    loss, rows = contrastive_loss_sum(pairs, batch([0, 1], [0, 1], [-1, -1]), ContrastiveConfig())
    assert rows == 2 and loss.item() == pytest.approx(2 * math.log(1 + math.exp(-2)), rel=1e-6)


def test_scale_is_clamped_at_100_and_found_through_wrappers() -> None:
    model = Fixed(IMAGES, TEXTS, scale=250.0)
    wrapper = torch.nn.Module()
    wrapper.module = model  # what DDP / a DeepSpeed engine look like from outside
    assert logit_scale(wrapper).item() == pytest.approx(100.0)
    model.logit_scale.data.fill_(math.log(7.0))
    assert logit_scale(wrapper).item() == pytest.approx(7.0)
    with pytest.raises(ValueError, match="logit_scale"):
        logit_scale(torch.nn.Linear(2, 2))


def test_filler_rows_are_neither_anchors_nor_candidates() -> None:
    extra = [[5.0, -1.0], [-3.0, 0.5]]  # fillers that would be strong negatives
    model = Fixed(IMAGES + extra, TEXTS + extra, scale=3.0)
    plain = contrastive_loss_sum(
        model, batch([0, 1, 2], [0, 1, 2], [0, -1, 1]), ContrastiveConfig()
    )
    plain[0].backward()
    grads = model.image.grad.clone(), model.text.grad.clone(), model.logit_scale.grad.clone()
    model.zero_grad()
    padded = batch([3, 0, 1, 4, 2], [3, 0, 1, 4, 2], [FILLER, 0, -1, FILLER, 1])
    loss, rows = contrastive_loss_sum(model, padded, ContrastiveConfig())
    assert rows == 3 and loss.item() == pytest.approx(plain[0].item(), rel=1e-6)
    loss.backward()
    torch.testing.assert_close(model.image.grad, grads[0])
    torch.testing.assert_close(model.text.grad, grads[1])
    torch.testing.assert_close(model.logit_scale.grad, grads[2])
    assert model.image.grad[3:].abs().sum() == 0 and model.text.grad[3:].abs().sum() == 0


def test_a_batch_of_fillers_still_gives_every_parameter_a_gradient() -> None:
    """DDP expects a gradient for each parameter on every process, every step."""
    model = Fixed(IMAGES, TEXTS, scale=2.0)
    loss, rows = contrastive_loss_sum(
        model, batch([0, 1], [0, 1], [FILLER, FILLER]), ContrastiveConfig()
    )
    assert rows == 0 and loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in model.parameters())


def test_classification_term_over_class_prompts() -> None:
    prompts = [[1.0, 0.2], [-0.5, 1.0]]  # text rows 3 and 4: classes 0 and 1
    model = Fixed(IMAGES, TEXTS + prompts, scale=4.0)
    labels = [1, -1, 0]  # row 1 has no class
    b = batch([0, 1, 2], [0, 1, 2, 3, 4], labels)
    cfg = ContrastiveConfig(classification_weight=0.5)
    loss, rows = contrastive_loss_sum(model, b, cfg)
    img, prm = [unit(v) for v in IMAGES], [unit(v) for v in prompts]
    cls = [ce([4.0 * dot(img[i], p) for p in prm], labels[i]) for i in (0, 2)]
    expected = sum(hand_infonce(IMAGES, TEXTS, 4.0)) + 0.5 * sum(cls)
    assert rows == 3 and loss.item() == pytest.approx(expected, rel=1e-6)
    # weight 0: the prompt rows are only carried along (not negatives, no extra term)
    off = contrastive_loss_sum(model, b, ContrastiveConfig())[0]
    assert off.item() == pytest.approx(sum(hand_infonce(IMAGES, TEXTS, 4.0)), rel=1e-6)


def test_eval_loss_is_the_mean_over_one_whole_batch() -> None:
    torch.manual_seed(0)
    image, text = torch.randn(7, 4), torch.randn(7, 4)
    model = Fixed(image.tolist(), text.tolist(), scale=5.0)
    total, rows = contrastive_loss_sum(
        model, batch(list(range(7)), list(range(7)), [-1] * 7), ContrastiveConfig()
    )
    for chunk in (2, 7, 1024):
        got = contrastive_eval_loss(image, text, scale=5.0, chunk=chunk)
        assert got == pytest.approx(total.item() / rows, rel=1e-6)


def angles(*degrees: float) -> torch.Tensor:
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)


def test_retrieval_recall_with_repeated_captions() -> None:
    """Points on a circle (similarity = cos of the angle between). Captions a..f at 0, 20,
    .., 100 degrees; row 1 repeats caption a (its own text, at 170, is not used: a caption
    is embedded by its first row). Worked out by hand:
    image->text  img0 (2): a first | img1 (101): f e d c b above a, miss @5 | img2 (37): c
      above b | img3 (150): f e d above c | img4..6: exact -> @1 4/7, @5 6/7
    text->image  a: img0 first | b (20): img2 at 17 beats img0 at 18 | c (40): img2 img4
      img0 img5 img6 img1 above img3, miss @5 | d e f exact -> @1 6/7, @5 6/7"""
    captions = ["a", "a", "b", "c", "d", "e", "f"]
    text = angles(0, 170, 20, 40, 60, 80, 100)
    image = angles(2, 101, 37, 150, 60, 80, 100)
    got = retrieval_metrics(image, text, captions, chunk=3)
    assert got == pytest.approx(
        {"eval_i2t_r1": 4 / 7, "eval_i2t_r5": 6 / 7, "eval_t2i_r1": 6 / 7, "eval_t2i_r5": 6 / 7}
    )


def test_retrieval_ties_count_against_the_model() -> None:
    same = torch.ones(4, 3)
    got = retrieval_metrics(same, same, ["a", "b", "a", "c"])
    assert got["eval_i2t_r1"] == 0 and got["eval_t2i_r1"] == 0
    # with fewer than 5 wrong candidates every row is a hit at 5, ties or not
    assert got["eval_i2t_r5"] == 1 and got["eval_t2i_r5"] == 1


def test_zero_shot_accuracy_and_prompts() -> None:
    assert class_prompts(["cat", "dog"], "a {label} {x}") == ["a cat {x}", "a dog {x}"]
    prompts = angles(0, 90, 180)
    image = angles(10, 80, 100, 170, 45)
    labels = torch.tensor([0, 1, 2, 2, -1])  # row 2 is closer to class 1; row 4 unlabelled
    assert zero_shot_accuracy(image, prompts, labels) == pytest.approx(3 / 4)
    assert zero_shot_accuracy(image, prompts, torch.full((5,), -1)) is None


# ---- the tiny CLIP ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bigft.tiny_clip import save_tiny_clip

    texts = [f"a photo of the digit {d}" for d in DIGITS]
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), texts)


def digit_images(n: int) -> tuple[list, list[str]]:
    """The first n of scikit-learn's 8x8 digits as RGB PIL images, with their captions."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).convert("RGB")
        for i in range(n)
    ]
    return images, [f"a photo of the digit {DIGITS[t]}" for t in digits.target[:n]]


def test_tiny_clip_loads_with_the_auto_classes_and_pools_at_eos(tiny_clip: Path) -> None:
    from transformers import AutoModel, AutoProcessor, CLIPModel

    processor = AutoProcessor.from_pretrained(tiny_clip)
    model = AutoModel.from_pretrained(tiny_clip)
    assert type(model) is CLIPModel and type(processor).__name__ == "CLIPProcessor"
    assert type(CLIPModel.from_pretrained(tiny_clip)) is CLIPModel
    tok, text_cfg = processor.tokenizer, model.config.text_config
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (
        text_cfg.eos_token_id,
        text_cfg.bos_token_id,
        text_cfg.pad_token_id,
    )
    assert text_cfg.eos_token_id != 2  # 2 selects transformers' legacy argmax pooling
    assert len(tok) <= text_cfg.vocab_size

    images, captions = digit_images(2)
    long = "an unseen caption, Ünïcode too " * 10  # longer than model_max_length
    inputs = processor(
        text=[captions[0], long], images=images, return_tensors="pt", padding=True, truncation=True
    )
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    ids = inputs["input_ids"]
    assert ids.shape[1] == tok.model_max_length == text_cfg.max_position_embeddings
    assert ids[1, -1] == tok.eos_token_id and ids[0, 0] == tok.bos_token_id  # eos survives
    assert tok.decode(ids[0], skip_special_tokens=True) == captions[0]
    out = model(**inputs)
    assert out.image_embeds.shape == out.text_embeds.shape == (2, 32)
    eos_at = (ids == tok.eos_token_id).int().argmax(1)
    hidden = out.text_model_output.last_hidden_state
    pooled = model.text_projection(hidden[torch.arange(2), eos_at])
    torch.testing.assert_close(out.text_embeds, pooled / pooled.norm(dim=-1, keepdim=True))
    assert eos_at[0] == int(inputs["attention_mask"][0].sum()) - 1  # the last real token


def test_a_few_steps_on_the_tiny_clip_lower_the_loss(tiny_clip: Path) -> None:
    """8 fixed digit images (0..7) with their captions: 30 AdamW steps on the summed loss
    take the mean loss from about log 8 to under a quarter of it (measured: 2.09 -> 0.06)."""
    from transformers import AutoProcessor, CLIPModel

    processor = AutoProcessor.from_pretrained(tiny_clip)
    model = CLIPModel.from_pretrained(tiny_clip)
    images, captions = digit_images(8)
    inputs = processor(text=captions, images=images, return_tensors="pt", padding=True)
    b = {**inputs, "labels": torch.full((8,), -1)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(30):
        loss, rows = contrastive_loss_sum(model, b, ContrastiveConfig())
        (loss / rows).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item() / rows)
    assert losses[0] == pytest.approx(math.log(8), abs=0.3)  # random init: near uniform
    assert losses[-1] < 0.25 * losses[0], losses
