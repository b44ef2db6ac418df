"""task image_classification and task contrastive, end to end on the handwritten digits
that ship with scikit-learn (bigft.digits), through the same setup / loop / evaluation as
every other task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from bigft.config_io import load_config
from bigft.digits import NAMES, save_resnet_base, save_vit_base, write_digits
from bigft.loop.setup import setup
from bigft.loop.train import train
from bigft.tracking import read_metrics

OLD = [NAMES[d] for d in range(5)]  # pretraining classes
NEW = [NAMES[d] for d in range(5, 10)]  # the fine-tuning task's classes


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("digits")
    return {
        "old": write_digits(root / "old", range(5), size=16),
        "new": write_digits(root / "new", range(5, 10), size=16),
        "captions": write_digits(root / "captions", layout="jsonl", size=16),
        "small": write_digits(root / "small", range(5, 10), size=16, limit=24),
    }


def image_config(tmp_path: Path, name: str, model: Path, rows: Path, **sections: Any) -> Path:
    """A config over an image folder of digits; classes in digit order (data.label_names:
    sorted folder names would be eight, five, nine, ...)."""
    classes = OLD if (rows / "zero").is_dir() else NEW
    config: dict[str, Any] = {
        "task": "image_classification",
        "model": {"name_or_path": str(model)},
        "data": {
            "train": str(rows),
            "label_names": classes,
            "split": {"train": 0.8, "validation": 0.2, "test": 0.0},
        },
        "method": {"name": "full"},
        "optim": {"lr": 1e-3, "weight_decay": 0.0},
        "train": {"micro_batch_size": 16, "steps": 20, "log_every": 5, "seed": 0},
        "logging": {"progress_bar": False},
        "output_dir": str(tmp_path / name),
    }
    for key, values in sections.items():
        config[key] = {**config.get(key, {}), **values}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(path: Path, *overrides: str) -> dict[str, Any]:
    """Train the config; the summary (test / validation results included)."""
    return train(setup(load_config(path, list(overrides))))


def test_transfer_beats_random_initialisation(digits: dict[str, Path], tmp_path: Path) -> None:
    """A ViT pretrained (by bigft) on digits 0-4, its head swapped for 5-9, beats the same
    architecture from random initialisation on held-out digits 5-9, trained on 50 images:
    head only by 0.08 accuracy or more, full fine-tuning by 0.2 or more (measured: +0.12
    to +0.15 and +0.35; a small ResNet shows no such gain on digits, see README)."""
    random5 = save_vit_base(tmp_path / "random-vit", OLD, size=16)
    pre_cfg = image_config(
        tmp_path,
        "pretrain",
        random5,
        digits["old"],
        data={"split": {"train": 0.9, "validation": 0.1, "test": 0.0}},
        train={"micro_batch_size": 32, "steps": 300, "log_every": 100},
    )
    pretrained = run(pre_cfg)
    assert pretrained["validation"]["eval_accuracy"] > 0.85
    base = tmp_path / "pretrain" / "final"
    assert json.loads((base / "config.json").read_text())["id2label"]["0"] == "zero"

    # 50 training images of 5-9; the other 846 are held out.
    split = {"split": {"train": 0.0557, "validation": 0.0, "test": 0.9443}}
    scores: dict[tuple[str, str], float] = {}
    for method in ("head", "full"):
        for start, model in (("pretrained", base), ("random", random5)):
            name = f"{method}-{start}"
            method_cfg = (
                {"name": "freeze", "train_top_layers": 0} if method == "head" else {"name": "full"}
            )
            lr = 1e-2 if method == "head" else 1e-3
            cfg = image_config(
                tmp_path,
                name,
                model,
                digits["new"],
                data=split,
                method=method_cfg,
                optim={"lr": lr},
                train={"steps": 60, "log_every": 60},
            )
            summary = run(cfg)
            assert summary["test"]["eval_examples"] == 846
            scores[(method, start)] = summary["test"]["eval_accuracy"]
            saved = json.loads((tmp_path / name / "final" / "config.json").read_text())
            assert [saved["id2label"][str(i)] for i in range(5)] == NEW
    head = scores[("head", "pretrained")] - scores[("head", "random")]
    full = scores[("full", "pretrained")] - scores[("full", "random")]
    assert head >= 0.08, scores
    assert full >= 0.2, scores


def test_head_only_trains_the_new_head_alone(digits: dict[str, Path], tmp_path: Path) -> None:
    """freeze with train_top_layers 0 on a ResNet: only the classifier changes, the stem
    and every stage keep the base's weights; the head is new (the base had other classes)."""
    from safetensors.torch import load_file

    base = save_resnet_base(tmp_path / "resnet", OLD, size=16)
    cfg = image_config(
        tmp_path, "head", base, digits["small"], method={"name": "freeze", "train_top_layers": 0}
    )
    run(cfg)
    before = load_file(base / "model.safetensors")
    after = load_file(tmp_path / "head" / "final" / "model.safetensors")
    changed = {k for k in before if "num_batches_tracked" not in k and "running" not in k}
    changed = {k for k in changed if not torch.equal(before[k], after[k])}
    assert changed == {"classifier.1.weight", "classifier.1.bias"}


def test_lora_on_vit_and_bigft_eval(digits: dict[str, Path], tmp_path: Path) -> None:
    """LoRA on a ViT trains adapters and the new head; the exported adapter scores the same
    under `bigft eval` as at the end of training."""
    from bigft.eval.standalone import evaluation_job, run_evaluation

    base = save_vit_base(tmp_path / "vit", OLD, size=16)
    cfg = image_config(
        tmp_path,
        "lora",
        base,
        digits["small"],
        method={"name": "lora", "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"}},
        optim={"lr": 5e-3},
    )
    summary = run(cfg)
    final = tmp_path / "lora" / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["classifier"]
    with evaluation_job(tmp_path / "lora", None, None, []) as job:
        from rich.console import Console

        scored = run_evaluation(job, Console(quiet=True))
    assert scored["validation"]["eval_accuracy"] == pytest.approx(
        summary["validation"]["eval_accuracy"]
    )
    assert scored["validation"]["eval_loss"] == pytest.approx(
        summary["validation"]["eval_loss"], rel=1e-4
    )


def test_contrastive_raises_recall_and_zero_shot(digits: dict[str, Path], tmp_path: Path) -> None:
    """A tiny CLIP trained on digit images and their captions ("a photo of the digit
    seven"): held-out image->text recall@1 and zero-shot accuracy over the ten prompts
    rise by 0.2 or more (measured on 16-pixel digits: see README)."""
    from bigft.tiny_clip import save_tiny_clip

    texts = [f"a photo of the digit {name}" for name in NAMES]
    base = save_tiny_clip(tmp_path / "clip", texts, image_size=16)
    config = {
        "task": "contrastive",
        "model": {"name_or_path": str(base)},
        "data": {
            "train": str(digits["captions"]),
            "label_names": list(NAMES),
            "split": {"train": 0.8, "validation": 0.2, "test": 0.0},
        },
        "contrastive": {"prompt": "a photo of the digit {label}"},
        "optim": {"lr": 5e-3, "weight_decay": 0.0},
        "train": {"micro_batch_size": 32, "steps": 100, "log_every": 20, "seq_len": 16},
        "eval": {"at_start": True, "every_steps": 100, "metric": "eval_i2t_r1"},
        "logging": {"progress_bar": False},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "clip.yaml"
    path.write_text(yaml.safe_dump(config))
    run(path)
    evals = [r for r in read_metrics(tmp_path / "run") if r.get("split") == "validation"]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] == 100
    assert last["eval_i2t_r1"] - first["eval_i2t_r1"] >= 0.2, (first, last)
    assert last["eval_zero_shot_accuracy"] - first["eval_zero_shot_accuracy"] >= 0.2
    assert last["eval_loss"] < first["eval_loss"]
