"""Training mixtures: data.train as several sources, each with its own format and share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from bigft.config import DataConfig, TrainSource
from bigft.config_io import load_config
from bigft.data import prepare_data
from bigft.data.formats import IGNORE_INDEX
from bigft.data.mixture import mix, mixture_indices, sources_of
from bigft.data.prepared import fingerprint
from bigft.errors import ConfigError
from tests.helpers import alpaca_rows, write_config, write_jsonl
from tests.unit.test_chat_masks import qwen_like


def sources(*specs: dict[str, Any]) -> list[TrainSource]:
    return [TrainSource(path=f"s{i}.jsonl", **spec) for i, spec in enumerate(specs)]


def test_weights_share_an_epoch_and_small_sources_repeat() -> None:
    of_row = np.repeat([0, 1], [10, 100])  # source 0 has 10 rows, source 1 has 100
    picked = mixture_indices(of_row, sources({"weight": 1}, {"weight": 1}), seed=3)
    assert len(picked) == 110  # an epoch holds as many rows as all sources together
    small, large = picked[of_row[picked] == 0], picked[of_row[picked] == 1]
    assert len(small) == len(large) == 55
    # 55 = 5 x every row of source 0, plus 5 more drawn without replacement.
    counts = np.bincount(small, minlength=10)
    assert sorted(counts.tolist()) == [5] * 5 + [6] * 5
    assert len(set(large.tolist())) == 55  # sampled without replacement
    again = mixture_indices(of_row, sources({"weight": 1}, {"weight": 1}), seed=3)
    assert np.array_equal(picked, again)  # the same on every process and every resume
    other = mixture_indices(of_row, sources({"weight": 1}, {"weight": 1}), seed=4)
    assert not np.array_equal(picked, other)


def test_epoch_counts_repeat_or_subsample_each_source() -> None:
    of_row = np.repeat([0, 1, 2], [10, 20, 7])
    picked = mixture_indices(of_row, sources({"epochs": 2}, {"epochs": 0.5}, {}), seed=0)
    per_source = np.bincount(of_row[picked], minlength=3).tolist()
    assert per_source == [20, 10, 7]
    assert np.bincount(picked[of_row[picked] == 0]).tolist() == [2] * 10
    assert len(set(picked[of_row[picked] == 1].tolist())) == 10


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ([{"path": "a.jsonl", "weight": 1, "epochs": 2}], "a weight or an epoch count"),
        (
            [{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl"}],
            "give every source a weight",
        ),
        (
            [{"path": "x/a.jsonl", "epochs": 2}, {"path": "y/a.jsonl"}],
            "two sources are named 'a'",
        ),
        ([{"path": "a.jsonl", "weight": 0}], "greater than 0"),
        ([{"path": "a.jsonl", "wieght": 1}], "wieght"),
    ],
)
def test_bad_mixtures_are_refused_with_the_key(
    tmp_path: Path, train: list[Any], message: str
) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(
        yaml.safe_dump(
            {"model": {"name_or_path": "m"}, "data": {"train": train}, "output_dir": "o"}
        )
    )
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert "data.train" in str(info.value)


def test_sources_need_task_causal_lm(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    config = {
        "model": {"name_or_path": "m"},
        "output_dir": "o",
        "task": "classification",
        "data": {"format": "text", "train": [{"path": "a.jsonl"}, {"path": "b.jsonl"}]},
    }
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="apply to task causal_lm"):
        load_config(path)


def test_source_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "conf"
    write_jsonl(data_dir / "a.jsonl", alpaca_rows(4))
    config = {
        "model": {"name_or_path": "m"},
        "output_dir": "o",
        "data": {"train": [{"path": "a.jsonl", "weight": 2}, "a.jsonl"]},
    }
    with pytest.raises(ConfigError, match="give every source a weight"):
        (data_dir / "bad.yaml").write_text(yaml.safe_dump(config))
        load_config(data_dir / "bad.yaml")
    config["data"] = {"train": [{"path": "a.jsonl", "name": "one"}, "a.jsonl"]}
    (data_dir / "cfg.yaml").write_text(yaml.safe_dump(config))
    cfg = load_config(data_dir / "cfg.yaml")
    assert cfg.data.train_files == [str(data_dir / "a.jsonl")] * 2
    assert [s.label for s in cfg.data.train_sources] == ["one", "a"]


def chat_rows(n: int) -> list[dict[str, Any]]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Say the number {i} in words, please."},
                {"role": "assistant", "content": f"It is number {i}."},
            ]
        }
        for i in range(n)
    ]


def test_each_source_is_formatted_by_its_own_format(tmp_path: Path) -> None:
    """An alpaca source and a chat source (ChatML template, byte-level BPE) in one split:
    each row is tokenized by its source's format and keeps its source through the split."""
    tokenizer = qwen_like()
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows(30))
    chats = write_jsonl(tmp_path / "chats.jsonl", chat_rows(20))
    cfg = DataConfig(
        format="alpaca",
        train=[
            {"path": str(alpaca), "weight": 1},  # type: ignore[list-item]
            {"path": str(chats), "format": "chat", "weight": 3},  # type: ignore[list-item]
        ],
        prompt_template="short",
        split={"train": 0.8, "validation": 0.2},  # type: ignore[arg-type]
        cache=False,
    )
    data = prepare_data(cfg, tokenizer, seq_len=256, seed=0)
    of_row = sources_of(data.train)
    assert set(of_row.tolist()) == {0, 1}
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    for ids, labels, source in zip(
        data.train["input_ids"], data.train["labels"], of_row.tolist(), strict=True
    ):
        text = tokenizer.decode(ids)
        if source == 1:  # ChatML: the assistant's reply is the target, the user's is not
            assert ids.count(im_start) >= 2 and "### Instruction" not in text
            targets = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
            assert targets.startswith("It is number") and "Say the number" not in targets
        else:
            assert "### Instruction" in text and im_start not in ids
    assert data.validation is not None
    assert set(sources_of(data.validation).tolist()) == {0, 1}

    mixed, shares = mix(data.train, cfg.train_sources, seed=0)
    assert [s.name for s in shares] == ["alpaca", "chats"]
    assert sum(s.rows for s in shares) == len(data.train)
    assert sum(s.epoch_rows for s in shares) == len(mixed) == len(data.train)
    assert shares[0].epoch_rows == round(len(data.train) / 4) < shares[0].rows  # sampled
    assert shares[1].epoch_rows > shares[1].rows  # the smaller source is repeated
    assert shares[1].epoch_tokens > shares[1].tokens


def test_weights_and_names_do_not_change_the_prepared_data(tmp_path: Path) -> None:
    """Mixing happens when a run starts: new weights reuse the prepared rows, a new format
    does not."""
    tokenizer = qwen_like()
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(5))
    b = write_jsonl(tmp_path / "b.jsonl", alpaca_rows(5, seed=1))

    def digest(first: dict[str, Any], second: dict[str, Any]) -> str:
        cfg = DataConfig(train=[{"path": str(a), **first}, {"path": str(b), **second}])  # type: ignore[list-item]
        return fingerprint(cfg, tokenizer, 64, 0, "causal_lm")

    base = digest({"weight": 1}, {"weight": 1})
    assert digest({"weight": 5, "name": "x"}, {"weight": 1}) == base
    assert digest({"epochs": 3}, {}) == base
    assert digest({"weight": 1, "format": "text"}, {"weight": 1}) != base


def test_a_mixture_trains_and_reports_each_source(tiny_base: Path, tmp_path: Path) -> None:
    from bigft.loop.setup import setup
    from bigft.loop.summary import startup_summary
    from bigft.loop.train import train
    from bigft.tracking import read_metrics

    a = write_jsonl(
        tmp_path / "upper.jsonl", [r for r in alpaca_rows(120) if "Upper" in r["instruction"]]
    )
    b = write_jsonl(
        tmp_path / "reverse.jsonl", [r for r in alpaca_rows(120) if "Rev" in r["instruction"]][:20]
    )
    path = write_config(
        tmp_path / "cfg.yaml",
        tiny_base,
        a,
        data={
            "train": [{"path": str(a), "weight": 1}, {"path": str(b), "weight": 1}],
            "format": "alpaca",
            "prompt_template": "{instruction}\n{input}\n",
            "split": {"train": 0.8, "validation": 0.2},
            "cache": False,
        },
        train={"seq_len": 64, "micro_batch_size": 2, "steps": 4, "precision": "fp32", "seed": 0},
        eval={"every_steps": 4},
    )
    run = setup(load_config(path))
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(startup_summary(run))
    shown = console.export_text()
    assert "source upper:" in shown and "source reverse:" in shown
    upper, reverse = run.mixture
    assert upper.epoch_rows == reverse.epoch_rows  # equal weights: equal shares
    assert reverse.epoch_rows > reverse.rows
    summary = train(run)
    assert [s["name"] for s in summary["mixture"]] == ["upper", "reverse"]
    evals = [r for r in read_metrics(run.output_dir) if r.get("split") == "validation"]
    last = evals[-1]
    assert last["eval_tokens/upper"] > 0 and last["eval_tokens/reverse"] > 0
    weighted = (
        last["eval_loss/upper"] * last["eval_tokens/upper"]
        + last["eval_loss/reverse"] * last["eval_tokens/reverse"]
    ) / (last["eval_tokens/upper"] + last["eval_tokens/reverse"])
    assert last["eval_loss"] == pytest.approx(weighted, rel=1e-9)
    assert last["eval_tokens"] == last["eval_tokens/upper"] + last["eval_tokens/reverse"]
    steps = [r for r in read_metrics(run.output_dir) if "loss" in r and "split" not in r]
    assert len(steps) == 4
    for record in steps:  # the step's loss is the targets-weighted mean of the sources'
        low, high = sorted((record["loss/upper"], record["loss/reverse"]))
        assert low - 1e-6 <= record["loss"] <= high + 1e-6
    saved = json.loads((run.output_dir / "summary.json").read_text())
    assert saved["mixture"][1]["epoch_rows"] == reverse.epoch_rows


@pytest.mark.parametrize(("packed", "impl"), [(True, "full"), (False, "full"), (True, "chunked")])
def test_the_loss_of_each_source_is_its_rows_loss_alone(packed: bool, impl: str) -> None:
    """One batch mixing two sources: each source's share of the summed loss and targets
    is exactly what its own rows give when scored alone, from full logits or inside the
    lm_head by chunks (smaller than a row, so sources meet inside a chunk)."""
    import torch
    from datasets import Dataset

    from bigft.data.packing import Collator, pack
    from bigft.losses import loss_sum
    from bigft.tiny import build_tiny_llama

    rng = np.random.default_rng(0)
    rows = []
    for i, length in enumerate(rng.integers(5, 20, size=8)):
        ids = rng.integers(4, 100, size=int(length)).tolist()
        labels = [IGNORE_INDEX] * 3 + ids[3:]
        rows.append({"input_ids": ids, "labels": labels, "source_id": i % 2})
    model = build_tiny_llama(vocab_size=100, seed=0).eval()
    if impl == "chunked":
        from bigft.chunked_loss import prepare_loss

        assert prepare_loss(model, "chunked", 16)["loss_impl"] == "chunked"
    collate = Collator(pad_token_id=0, packed=packed)

    def batch_of(selected: list[dict[str, Any]]) -> dict[str, Any]:
        if packed:
            return collate(list(pack(Dataset.from_list(selected), 64, seed=0)))
        return collate(selected)

    by_source = torch.zeros((2, 2), dtype=torch.float64)
    with torch.no_grad():
        total, targets = loss_sum(model, batch_of(rows), by_source=by_source)
        assert by_source[1].min() > 0
        assert by_source[0].sum().item() == pytest.approx(total.item(), rel=1e-6)
        assert by_source[1].sum().item() == targets.item()
        for source in (0, 1):
            alone = [r for r in rows if r["source_id"] == source]
            own, own_targets = loss_sum(model, batch_of(alone))
            assert by_source[0, source].item() == pytest.approx(own.item(), rel=1e-5)
            assert by_source[1, source].item() == own_targets.item()
