"""Mistakes specific to the image, contrastive and preference tasks: one line naming the
key, exit code 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bigft.commands import app

CASES = {
    "contrastive under zero3": (
        {"task": "contrastive", "parallel": {"strategy": "zero3"}},
        "task contrastive with parallel.strategy zero3",
    ),
    "image batch auto": (
        {"task": "image_classification", "train": {"micro_batch_size": "auto"}},
        "train.micro_batch_size auto: the memory planner models language models",
    ),
    "image augmentation on text": (
        {"task": "causal_lm", "data": {"augment": {"image": {"rotation": 10}}}},
        "data.augment.image: task causal_lm has no images",
    ),
    "text augmentation on images": (
        {"task": "image_classification", "data": {"augment": {"text": {"random_swap": 0.1}}}},
        "data.augment.text applies to text tasks",
    ),
    "crop share": (
        {
            "task": "image_classification",
            "data": {"augment": {"image": {"random_resized_crop": [0.9, 0.5]}}},
        },
        "random_resized_crop",
    ),
    "prompt without label": (
        {"task": "contrastive", "contrastive": {"prompt": "a photo"}},
        "needs a {label} placeholder",
    ),
    "preference with label names": (
        {"task": "preference", "data": {"label_names": ["a", "b"]}},
        "task preference reads prompt / chosen / rejected",
    ),
    "kto precomputed": (
        {"task": "preference", "preference": {"loss": "kto", "precompute_reference": True}},
        "loss kto draws its KL rows per batch",
    ),
    "simpo precomputed": (
        {"task": "preference", "preference": {"loss": "simpo", "precompute_reference": True}},
        "loss simpo has no reference model",
    ),
}


def write(tmp_path: Path, values: dict) -> Path:
    config = {
        "model": {"name_or_path": str(tmp_path)},
        "data": {"train": str(tmp_path / "rows.jsonl")},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in values.items():
        config[key] = (
            {**config[key], **value} if isinstance(value, dict) and key in config else value
        )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("case", CASES)
def test_one_line_exit_2_nothing_written(case: str, tmp_path: Path) -> None:
    values, message = CASES[case]
    result = CliRunner().invoke(app, ["train", str(write(tmp_path, values))])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "Traceback" not in result.output and message in " ".join(lines)
    assert not (tmp_path / "run").exists()


def test_plan_of_an_image_task_says_what_it_plans(tmp_path: Path) -> None:
    path = write(tmp_path, {"task": "image_classification"})
    result = CliRunner().invoke(app, ["plan", str(path)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "bigft plan models transformer language models" in lines[0]
