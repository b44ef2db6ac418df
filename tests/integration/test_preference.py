"""task preference end to end on a synthetic task: the correct transformation of a word
(upper case) is preferred to a corrupted one (one letter left in lower case). Held-out
reward accuracy, margins and what the reference model is, for each loss."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from bigft.config_io import load_config
from bigft.loop.setup import setup
from bigft.loop.train import train
from bigft.tracking import read_metrics


def pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(4, 6)))
        good = word.upper()
        j = rng.randrange(len(word))
        rows.append(
            {
                "prompt": f"upper {word} =",
                "chosen": f" {good}",
                "rejected": f" {good[:j]}{word[j]}{good[j + 1 :]}",
            }
        )
    return rows


def unpaired(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """KTO's rows: each pair as a desirable and an undesirable completion."""
    out: list[dict[str, Any]] = []
    for row in rows:
        out.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True})
        out.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
    return out


def run_preference(
    tmp_path: Path,
    base: Path,
    loss: str,
    method: dict[str, Any],
    lr: float,
    steps: int = 60,
    name: str | None = None,
    **preference: Any,
) -> tuple[Any, list[dict[str, Any]]]:
    rows = pairs(400)
    data = tmp_path / f"{loss}.jsonl"
    name = name or loss
    lines = unpaired(rows) if loss == "kto" else rows
    if not data.exists():  # a later run of the same data finds its preparation
        data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    config = {
        "task": "preference",
        "model": {"name_or_path": str(base)},
        "data": {
            "format": "text",
            "train": str(data),
            "split": {"train": 0.8, "validation": 0.2, "test": 0.0},
        },
        "preference": {"loss": loss, "beta": 0.1, **preference},
        "method": method,
        "optim": {"lr": lr, "weight_decay": 0.0},
        "train": {"micro_batch_size": 8, "steps": steps, "log_every": 10, "seq_len": 32},
        "eval": {"every_steps": steps, "at_start": True, "metric": "eval_rewards/margin"},
        "logging": {"progress_bar": False},
        "output_dir": str(tmp_path / name),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    run = setup(load_config(path))
    train(run)
    evals = [r for r in read_metrics(tmp_path / name) if r.get("split") == "validation"]
    return run, evals


LORA = {"name": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}


def test_dpo_with_lora_uses_the_base_as_reference(tiny_base: Path, tmp_path: Path) -> None:
    """The reference is the policy with its adapters disabled: no second model. At step 0
    policy and reference agree, so every reward is 0 (a tie, counted as wrong); after 60
    steps at least 90 % of held-out pairs rank the correct completion higher."""
    run, evals = run_preference(tmp_path, tiny_base, "dpo", LORA, 2e-3)
    assert run.teacher is None
    first, last = evals[0], evals[-1]
    assert first["eval_rewards/margin"] == 0.0 and first["eval_loss"] == pytest.approx(0.6931, 1e-3)
    assert last["eval_rewards/accuracy"] >= 0.9, last
    assert last["eval_rewards/margin"] > 0.05 and last["eval_loss"] < 0.68
    logged = [r for r in read_metrics(tmp_path / "dpo") if "rewards/accuracy" in r]
    assert logged and all("rewards/margin" in r and "logps/chosen" in r for r in logged)


def test_dpo_full_fine_tuning_keeps_a_frozen_reference(tiny_base: Path, tmp_path: Path) -> None:
    run, evals = run_preference(tmp_path, tiny_base, "dpo", {"name": "full"}, 5e-4)
    reference = run.teacher
    assert reference is not None and not any(p.requires_grad for p in reference.parameters())
    base = load_file(tiny_base / "model.safetensors")
    for name, param in reference.state_dict().items():  # the reference did not move
        assert torch.equal(param.float(), base[name].float()), name
    assert evals[-1]["eval_rewards/accuracy"] >= 0.9, evals[-1]
    assert evals[-1]["eval_rewards/margin"] > 0.2


def test_simpo_loads_no_reference_and_ranks_from_a_coin_flip(
    tiny_base: Path, tmp_path: Path
) -> None:
    """SimPO's rewards are the policy's own average log-probabilities: about half the pairs
    rank right before training, at least 90 % after."""
    run, evals = run_preference(tmp_path, tiny_base, "simpo", LORA, 2e-3)
    assert run.teacher is None
    assert 0.3 <= evals[0]["eval_rewards/accuracy"] <= 0.7, evals[0]
    assert evals[-1]["eval_rewards/accuracy"] >= 0.9, evals[-1]


@pytest.mark.parametrize("loss", ["ipo", "orpo"])
def test_ipo_and_orpo_learn_the_preference(loss: str, tiny_base: Path, tmp_path: Path) -> None:
    _, evals = run_preference(tmp_path, tiny_base, loss, LORA, 2e-3)
    assert evals[-1]["eval_rewards/accuracy"] >= 0.9, evals[-1]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]


def test_kto_separates_desirable_from_undesirable(tiny_base: Path, tmp_path: Path) -> None:
    """KTO's rows are unpaired: the margin is the mean reward of desirable completions
    minus that of undesirable ones; 0 before training, 0.05 or more after."""
    _, evals = run_preference(tmp_path, tiny_base, "kto", LORA, 2e-3)
    assert evals[0]["eval_rewards/margin"] == pytest.approx(0.0, abs=1e-9)
    assert evals[-1]["eval_rewards/margin"] >= 0.05, evals[-1]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_precomputed_reference_trains_as_the_live_one_does(
    method: str, tiny_base: Path, tmp_path: Path
) -> None:
    """preference.precompute_reference: one pass before step 1 scores every pair, stored
    beside the prepared data; the run holds no second model and logs the same losses and
    rewards as with the live reference (full: the frozen copy; lora: the base with the
    adapters disabled). A second run of the same data and model reuses the stored values."""
    chosen, lr = ({"name": "full"}, 5e-4) if method == "full" else (LORA, 2e-3)
    _, frozen = run_preference(tmp_path, tiny_base, "dpo", chosen, lr, steps=12, name="frozen")
    run, ahead = run_preference(
        tmp_path, tiny_base, "dpo", chosen, lr, steps=12, name="ahead", precompute_reference=True
    )
    assert run.teacher is None
    summary = json.loads((tmp_path / "ahead" / "summary.json").read_text())
    assert summary["reference"] == run.reference
    kept = len(run.data.train) + len(run.data.validation)  # 400 less exact duplicates
    assert run.reference.startswith(f"precomputed for {kept} pairs: computed in")
    stored = list(Path(run.reference.split("stored in ")[1]).parent.glob("*.npz"))
    assert len(stored) == 1
    with np.load(stored[0]) as saved:
        assert len(saved["train_chosen"]) + len(saved["validation_chosen"]) == kept
        # a summed log-probability of a completion of a few tokens, not a filler 0
        assert (saved["train_chosen"] < -1).all() and (saved["validation_rejected"] < -1).all()

    def curve(name: str) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in read_metrics(tmp_path / name) if "loss" in r]

    assert curve("ahead") == pytest.approx(curve("frozen"), rel=1e-5)
    for a, b in zip(ahead, frozen, strict=True):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)
        assert a["eval_rewards/margin"] == pytest.approx(b["eval_rewards/margin"], abs=1e-5)
    assert ahead[-1]["eval_rewards/accuracy"] > ahead[0]["eval_rewards/accuracy"]

    again, _ = run_preference(
        tmp_path, tiny_base, "dpo", chosen, lr, steps=12, name="again", precompute_reference=True
    )
    assert again.reference == f"precomputed for {kept} pairs: reused from {stored[0]}"
    assert curve("again") == pytest.approx(curve("ahead"), rel=1e-6)


def test_bigft_eval_scores_a_dpo_run_against_the_model_it_started_from(
    tiny_base: Path, tmp_path: Path
) -> None:
    """`bigft eval RUN` of a fully fine-tuned DPO run (its reference precomputed in
    training) loads the model the run started from as the reference: the rewards equal
    the run's own last evaluation. A bare model directory names no reference: one line."""
    from typer.testing import CliRunner

    from bigft.commands import app

    full = {"name": "full"}
    _, evals = run_preference(
        tmp_path, tiny_base, "dpo", full, 5e-4, steps=12, name="run", precompute_reference=True
    )
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)["validation"]
    last = evals[-1]
    assert last["eval_rewards/accuracy"] > 0.5  # the run moved away from its reference
    for key in ("eval_loss", "eval_rewards/margin", "eval_rewards/accuracy", "eval_pairs"):
        assert scored[key] == pytest.approx(last[key], rel=1e-5, abs=1e-6), key

    data = tmp_path / "dpo.jsonl"
    bare = [str(tmp_path / "run" / "final"), "--task", "preference", "--data", str(data)]
    refused = CliRunner().invoke(app, ["eval", *bare])
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.exit_code == 2 and len(lines) == 1, refused.output
    assert "score the run directory" in lines[0]
