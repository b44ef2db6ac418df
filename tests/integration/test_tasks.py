"""Tasks beyond causal LM on the tiny model: classification, regression, early stopping,
best checkpoint, distillation."""

from __future__ import annotations

import json
import operator
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from bigft.config_io import load_config
from bigft.loop.setup import setup
from bigft.loop.train import train
from bigft.tracking import read_metrics
from tests.helpers import alpaca_rows, write_config, write_jsonl


def labelled_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Strings dominated by 'a' or by 'h' (class), plus the share of 'a' (regression)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        major = rng.choice("ah")
        chars = [major] * rng.randint(4, 9) + [rng.choice("bcdefg") for _ in range(3)]
        rng.shuffle(chars)
        text = "".join(chars)
        rows.append(
            {
                "text": text,
                "label": "mostly_a" if major == "a" else "mostly_h",
                "share": round(text.count("a") / len(text), 4),
            }
        )
    return rows


def task_config(tmp_path: Path, tiny_base: Path, task: str) -> Path:
    """A classification / regression config over `labelled_rows`."""
    train_file = write_jsonl(tmp_path / "rows.jsonl", labelled_rows(160))
    path = write_config(
        tmp_path / "cfg.yaml",
        tiny_base,
        train_file,
        task=task,
        train={"seq_len": 32, "micro_batch_size": 8, "steps": 40},
        eval={"every_steps": 20, "at_start": True},
    )
    config = yaml.safe_load(path.read_text())
    config["data"] = {
        "train": str(train_file),
        "split": {"train": 0.75, "validation": 0.25},
        **({"label_field": "share"} if task == "regression" else {}),
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_classification_learns_and_reports_metrics(tiny_base, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    cfg = load_config(task_config(tmp_path, tiny_base, "classification"))
    run = setup(cfg)
    assert run.label_names == ["mostly_a", "mostly_h"]
    summary = train(run)
    evals = [r for r in read_metrics(cfg.output_dir) if r.get("split") == "validation"]
    before, after = evals[0], summary["validation"]
    assert after["eval_accuracy"] >= 0.9, after
    assert after["eval_accuracy"] > before["eval_accuracy"] + 0.3, (before, after)
    assert after["eval_loss"] < 0.5 * before["eval_loss"]
    assert after["eval_f1_macro"] >= 0.9 and after["eval_auc"] >= 0.95
    matrix = after["confusion_matrix"]
    assert sum(map(sum, matrix)) == after["eval_examples"] == len(run.data.validation)
    assert matrix[0][0] + matrix[1][1] == round(after["eval_accuracy"] * after["eval_examples"])

    exported = AutoModelForSequenceClassification.from_pretrained(Path(cfg.output_dir) / "final")
    assert exported.config.id2label == {0: "mostly_a", 1: "mostly_h"}
    ids = run.tokenizer(["aaaaabca", "hhhhhbch"], return_tensors="pt")
    with torch.no_grad():
        expected = run.model(**ids).logits
        got = exported(**ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert got.argmax(-1).tolist() == [0, 1]

    # `bigft eval` on the run directory, and on the exported model with the same rows
    from typer.testing import CliRunner

    from bigft.commands import app

    result = CliRunner().invoke(app, ["eval", cfg.output_dir])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)["validation"]
    assert scored["eval_accuracy"] == after["eval_accuracy"]
    assert scored["eval_loss"] == pytest.approx(after["eval_loss"], rel=1e-5)
    rows = write_jsonl(
        tmp_path / "held_out.jsonl",
        [
            {
                "text": run.tokenizer.decode(r["input_ids"], skip_special_tokens=True),
                "label": run.label_names[r["label"]],
            }
            for r in run.data.validation
        ],
    )
    model_dir = str(Path(cfg.output_dir) / "final")
    result = CliRunner().invoke(
        app, ["eval", model_dir, "--data", str(rows), "--task", "classification"]
    )
    assert result.exit_code == 0, result.output
    again = json.loads(result.stdout)["test"]
    assert again["confusion_matrix"] == after["confusion_matrix"]
    result = CliRunner().invoke(app, ["eval", model_dir])
    assert result.exit_code == 2 and "--data" in result.output


def test_regression_reduces_error(tiny_base, tmp_path) -> None:
    cfg = load_config(task_config(tmp_path, tiny_base, "regression"), ["eval.metric=eval_mae"])
    summary = train(setup(cfg))
    evals = [r for r in read_metrics(cfg.output_dir) if r.get("split") == "validation"]
    assert summary["validation"]["eval_mse"] < 0.3 * evals[0]["eval_mse"], evals
    assert summary["validation"]["eval_mae"] < 0.1


def test_early_stopping_keeps_and_loads_best(tiny_base, tmp_path) -> None:
    # min_delta larger than any possible gain: only the first evaluation is a "best".
    cfg = load_config(
        task_config(tmp_path, tiny_base, "classification"),
        [
            "eval.at_start=false",
            "eval.every_steps=2",
            "eval.metric=eval_accuracy",
            "eval.early_stopping.patience=2",
            "eval.early_stopping.min_delta=2.0",
            "checkpoint.every_steps=1",
            "checkpoint.keep_last=1",
            "checkpoint.load_best_at_end=true",
        ],
    )
    summary = train(setup(cfg))
    out = Path(cfg.output_dir)
    assert summary["steps"] == 6 and summary["early_stopped"] is True
    assert summary["best"]["step"] == 2 and summary["best"]["metric"] == "eval_accuracy"
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    assert best["checkpoint"] == "step-00000002"
    assert (out / "checkpoints" / "best").resolve() == (out / "checkpoints" / "step-00000002")
    # keep_last 1 plus the best
    names = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert names == ["step-00000002", "step-00000006"]
    # the exported model holds the best checkpoint's weights, not the last step's
    best_weights = load_file(out / "checkpoints" / "step-00000002" / "model.safetensors")
    last_weights = load_file(out / "checkpoints" / "step-00000006" / "model.safetensors")
    final = load_file(out / "final" / "model.safetensors")
    name = next(k for k in best_weights if "layers.0.self_attn.q_proj" in k)
    assert not torch.equal(best_weights[name], last_weights[name])
    assert torch.equal(final[name], best_weights[name])


def test_eval_metric_must_exist_for_task(tiny_base, tmp_path) -> None:
    from bigft.errors import ConfigError

    with pytest.raises(ConfigError, match="eval_accuracy"):
        load_config(
            task_config(tmp_path, tiny_base, "classification"), ["eval.metric=eval_acuracy"]
        )


def test_distillation_pulls_student_to_teacher(tiny_base, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from bigft.data import Collator
    from bigft.losses import distill_loss_sum, logits_and_labels

    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(96))
    teacher_cfg = load_config(
        write_config(tmp_path / "t.yaml", tiny_base, data),
        ["train.steps=40", f"output_dir={tmp_path / 'teacher'}"],
    )
    train(setup(teacher_cfg))
    teacher_dir = tmp_path / "teacher" / "final"

    cfg = load_config(
        write_config(tmp_path / "s.yaml", tiny_base, data),
        [
            "train.steps=30",
            f"distill.teacher={teacher_dir}",
            "distill.weight=1.0",
            "distill.temperature=2.0",
            f"output_dir={tmp_path / 'student'}",
        ],
    )
    run = setup(cfg)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    padded = Collator(run.tokenizer.pad_token_id, packed=False)
    batch = padded([run.data.validation[i] for i in range(8)])

    def kl() -> float:
        with torch.no_grad():
            s, labels = logits_and_labels(run.model, batch)
            t, _ = logits_and_labels(teacher, batch)
            return float(distill_loss_sum(s, t, labels, 1.0) / (labels != -100).sum())

    before = kl()
    train(run)
    after = kl()
    assert after < 0.3 * before, (before, after)


def test_eval_and_scorer_mistakes_are_one_line(tiny_base, tmp_path) -> None:
    from typer.testing import CliRunner

    from bigft.commands import app
    from bigft.errors import ConfigError
    from bigft.eval.metrics import load_scorer

    path = write_config(tmp_path / "c.yaml", tiny_base, tmp_path / "x.jsonl")
    with pytest.raises(ConfigError, match="module:function"):
        load_config(path, ["eval.scorer=nocolon", "eval.generate.enabled=true"])
    with pytest.raises(ConfigError, match="set eval.generate.enabled"):
        load_config(path, ["eval.scorer=json:dumps"])
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_xyz'"):
        load_scorer("no_such_module_xyz:score")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        load_scorer("json:nope")
    assert load_scorer("operator:eq") is operator.eq  # takes (predictions, references)

    result = CliRunner().invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 2
    assert "neither a bigft run directory nor a model directory" in result.output
    assert "Traceback" not in result.output
