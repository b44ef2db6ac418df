"""Back-translation for data.augment.text: paraphrases made by translating each text into
a pivot language and back, through two local seq2seq model directories
(`AutoModelForSeq2SeqLM`, e.g. MarianMT), greedily, in batches, on the CPU of the process
that prepares the data. Greedy decoding makes a text's paraphrase a function of the text
and the two models only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bigft.config import BackTranslationConfig
from bigft.errors import ConfigError

KEY = "data.augment.text.back_translation"


class BackTranslator:
    """Paraphrases: each text translated by data.augment.text.back_translation.forward,
    the result back by .backward; greedy, in batches, on the CPU."""

    def __init__(self, cfg: BackTranslationConfig) -> None:
        self.cfg = cfg
        self.models = [_seq2seq(cfg.forward, "forward"), _seq2seq(cfg.backward, "backward")]

    def __call__(self, texts: Sequence[str]) -> list[str]:
        out = list(texts)
        for tokenizer, model in self.models:
            out = self._translate(tokenizer, model, out)
        return out

    def _translate(self, tokenizer: Any, model: Any, texts: list[str]) -> list[str]:
        import torch

        limit = min(
            int(getattr(tokenizer, "model_max_length", 0) or 0) or 10**9,
            int(getattr(model.config, "max_position_embeddings", 0) or 0) or 10**9,
        )
        out: list[str] = []
        size = self.cfg.batch_size
        for start in range(0, len(texts), size):
            batch = tokenizer(
                texts[start : start + size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=limit,
            )
            with torch.inference_mode():
                ids = model.generate(
                    **batch,
                    max_new_tokens=self.cfg.max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                )
            out += [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return out


def _seq2seq(path: str, which: str) -> tuple[Any, Any]:
    """(tokenizer, model) of a local seq2seq model directory, or a one-line ConfigError."""
    where = f"{KEY}.{which}: {path}"
    if not Path(path).is_dir():
        raise ConfigError(f"{where}: no such model directory")
    try:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForSeq2SeqLM.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(
            f"{where}: not a loadable translation (seq2seq) model directory ({reason})"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model.eval()
