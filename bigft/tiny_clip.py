"""A tiny CLIP (image + text towers) made in code, for the contrastive demo and tests.

Saved with `save_pretrained` as a model directory plus a `CLIPProcessor` (byte-level BPE
tokenizer trained on the given texts, `CLIPImageProcessor`), so it loads through
`AutoProcessor` / `AutoModel.from_pretrained` like a downloaded CLIP checkpoint.

Pooling: CLIP's text tower takes the hidden state at the first `eos_token_id` of each row.
Two things make config and tokenizer agree on that position:
- the tokenizer appends eos to every encoding (after truncation too), and
- eos is not token id 2: transformers treats `eos_token_id == 2` as a pre-2023 CLIP
  config and pools at the row's highest token id instead (`input_ids.argmax(-1)`),
  which here would be an ordinary word piece.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PAD, EOS, BOS = "<pad>", "<|endoftext|>", "<|startoftext|>"
# ids 0, 1, 2 in this order: eos must not be id 2 (see the module docstring)
SPECIAL_TOKENS = [PAD, EOS, BOS]


def build_clip_tokenizer(texts: list[str], vocab_size: int = 384, max_length: int = 64) -> Any:
    """A lowercasing byte-level BPE fast tokenizer trained on `texts`.

    Every byte is in the vocabulary, so any text encodes; encodings are
    `<|startoftext|> ... <|endoftext|>`, truncated to `max_length` with eos kept.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    ids = {token: backend.token_to_id(token) for token in SPECIAL_TOKENS}
    assert [ids[t] for t in SPECIAL_TOKENS] == [0, 1, 2], ids
    backend.post_processor = TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, ids[BOS]), (EOS, ids[EOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=max_length,
    )


def build_tiny_clip(
    vocab_size: int,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    projection_dim: int = 32,
    max_positions: int = 64,
    seed: int = 0,
) -> Any:
    """A randomly initialized `CLIPModel` with tiny towers (fixed seed), whose text config
    names the ids of SPECIAL_TOKENS."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    tower: dict[str, Any] = {
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "projection_dim": projection_dim,
    }
    text = CLIPTextConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        pad_token_id=SPECIAL_TOKENS.index(PAD),
        bos_token_id=SPECIAL_TOKENS.index(BOS),
        eos_token_id=SPECIAL_TOKENS.index(EOS),
        **tower,
    )
    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, **tower)
    config = CLIPConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    return CLIPModel(config).float()


def build_image_processor(image_size: int) -> Any:
    """CLIP's preprocessing (resize the short side, center crop, CLIP mean/std) at
    `image_size` pixels."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )


def save_tiny_clip(path: str | Path, texts: list[str], image_size: int = 32, seed: int = 0) -> Path:
    """Write a tiny CLIP model + processor directory: `AutoProcessor.from_pretrained(path)`
    and `AutoModel.from_pretrained(path)` load it. `texts` train the tokenizer."""
    from transformers import CLIPProcessor

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_clip_tokenizer(texts)
    model = build_tiny_clip(len(tokenizer), image_size=image_size, seed=seed)
    processor = CLIPProcessor(
        image_processor=build_image_processor(image_size), tokenizer=tokenizer
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
