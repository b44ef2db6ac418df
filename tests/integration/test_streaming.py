"""Streaming training data (data.streaming): sharding without duplicates, exact resume,
clear errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from bigft.config_io import load_config
from bigft.errors import ConfigError, DataError
from bigft.loop.setup import setup
from bigft.loop.train import train
from tests.helpers import alpaca_rows, write_config, write_jsonl


def numbered_rows(n: int) -> list[dict[str, str]]:
    """Rows whose output names their number, so a batch shows which rows it holds."""
    return [{"instruction": "Echo.", "input": "", "output": f"row {i:04d}"} for i in range(n)]


def streamed_config(tmp_path: Path, model: Path, train: Any, *overrides: str) -> Any:
    path = write_config(
        tmp_path / "cfg.yaml",
        model,
        tmp_path / "unused.jsonl",
        data={
            "format": "alpaca",
            "train": train,
            "streaming": True,
            "prompt_template": "{instruction}\n{input}\n",
            "cache": False,
        },
    )
    return load_config(path, list(overrides))


def rows_of_epoch(tokenizer: Any, cfg: Any, rank: int, world: int, workers: int) -> Counter[str]:
    """Row numbers one rank reads in epoch 0 (unpacked), through the real loader."""
    from bigft.data.streaming import StreamLoader

    def texts(rows: list[dict[str, Any]]) -> list[str]:
        return [tokenizer.decode(r["input_ids"]).split("row ")[1][:4] for r in rows]

    loader = StreamLoader(
        cfg.data,
        tokenizer,
        64,
        0,
        batch_size=1,
        rank=rank,
        world_size=world,
        packed=False,
        collate=texts,
        workers=workers,
    )
    seen: Counter[str] = Counter()
    for batch in loader:
        if loader.epoch > 0:
            break
        seen.update(batch)
    return seen


@pytest.mark.parametrize(("world", "workers"), [(2, 0), (2, 2), (1, 3)])
def test_ranks_and_workers_read_each_row_once(
    tokenizer: Any, tiny_base: Path, tmp_path: Path, world: int, workers: int
) -> None:
    """A directory of 4 files (4 shards): over ranks and loader workers, every row of an
    epoch is read exactly once."""
    corpus = tmp_path / "corpus"
    rows = numbered_rows(60)
    for k in range(4):
        write_jsonl(corpus / f"part-{k}.jsonl", rows[k * 15 : (k + 1) * 15])
    cfg = streamed_config(tmp_path, tiny_base, str(corpus), "train.steps=5")
    per_rank = [rows_of_epoch(tokenizer, cfg, r, world, workers) for r in range(world)]
    total = sum(per_rank, Counter())
    assert sorted(total) == [f"{i:04d}" for i in range(60)]
    assert set(total.values()) == {1}
    if world == 2:
        assert not set(per_rank[0]) & set(per_rank[1])


def final_weights(tmp_path: Path, tiny_base: Path, data: Path, out: str, **kw: Any) -> Any:
    interrupt, workers = kw.get("interrupt", False), kw.get("workers", 0)
    cfg = streamed_config(
        tmp_path,
        tiny_base,
        str(data),
        "train.steps=9",
        "train.micro_batch_size=2",
        "train.grad_accum=2",
        "train.seq_len=48",
        "checkpoint.every_steps=100",
        f"data.loader_workers={workers}",
        f"output_dir={out}",
    )
    if interrupt:
        stopped = train(setup(cfg), stop_after=4)
        assert stopped["stopped"] and stopped["steps"] == 4
        saved = json.loads(
            (Path(out) / "checkpoints" / "step-00000004" / "trainer_state.json").read_text()
        )
        assert saved["loader"]["stream"] is not None  # the stream's position was kept
    run = setup(cfg)
    assert run.state.step == (4 if interrupt else 0)
    summary = train(run)
    return load_file(Path(out) / "final" / "model.safetensors"), summary


@pytest.mark.parametrize("workers", [0, 2])
def test_a_killed_streamed_run_resumes_at_the_exact_row(
    tiny_base: Path, tmp_path: Path, workers: int
) -> None:
    """9 steps of 4 packed rows cross an epoch boundary of the 70-row stream; stopped at
    step 4 and resumed, the run ends with the weights of the uninterrupted run."""
    data = write_jsonl(tmp_path / "stream.jsonl", alpaca_rows(70))
    straight, _ = final_weights(tmp_path, tiny_base, data, str(tmp_path / "a"))
    resumed, summary = final_weights(
        tmp_path, tiny_base, data, str(tmp_path / "b"), interrupt=True, workers=workers
    )
    assert summary["steps"] == 9
    from bigft.tracking import read_metrics

    epochs = [r["epoch"] for r in read_metrics(tmp_path / "b") if "loss" in r]
    assert epochs[0] == 0 and epochs[-1] >= 1  # the resumed part crossed an epoch
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    if workers == 0:  # a different reading order would change them
        other, _ = final_weights(
            tmp_path, tiny_base, write_jsonl(tmp_path / "s2.jsonl", alpaca_rows(70, seed=5)),
            str(tmp_path / "c"),
        )  # fmt: skip
        assert not all(torch.equal(straight[n], other[n]) for n in straight)


def test_a_streamed_run_learns(tiny_base: Path, tmp_path: Path) -> None:
    from bigft.tracking import read_metrics

    data = write_jsonl(tmp_path / "stream.jsonl", alpaca_rows(200))
    cfg = streamed_config(tmp_path, tiny_base, str(data), "train.steps=30")
    train(setup(cfg))
    losses = [r["loss"] for r in read_metrics(Path(cfg.output_dir)) if "loss" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], losses


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_row_in_the_stream_names_its_line(
    tiny_base: Path, tmp_path: Path, workers: int
) -> None:
    rows: list[dict[str, Any]] = alpaca_rows(30)
    rows[17] = {"instruction": "Echo.", "input": "", "answer": "no output field"}
    data = write_jsonl(tmp_path / "stream.jsonl", rows)
    cfg = streamed_config(
        tmp_path, tiny_base, str(data), "train.steps=40", f"data.loader_workers={workers}"
    )
    with pytest.raises(DataError) as info:
        train(setup(cfg))
    message = str(info.value)
    assert message.startswith(f"{data}:18: "), message
    assert "Traceback" not in message and "\n" not in message


def test_streaming_needs_steps(tiny_base: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.streaming needs task causal_lm and train.steps"):
        streamed_config(tmp_path, tiny_base, "x.jsonl", "train.steps=null")


def test_streamed_rows_pass_the_length_and_language_filters(
    tokenizer: Any, tiny_base: Path, tmp_path: Path
) -> None:
    from bigft.data.streaming import StreamLoader

    english = [
        "The weather is lovely today and we are going for a walk in the park.",
        "Please remember to bring the documents to the meeting tomorrow morning.",
        "She has been reading a very interesting book about the history of science.",
    ]
    german = [
        "Das Wetter ist heute sehr schön und wir gehen im Park spazieren.",
        "Bitte denken Sie daran, die Unterlagen morgen früh zur Besprechung mitzubringen.",
    ]
    rows = [{"instruction": "Say it.", "input": "", "output": t} for t in english + german]
    rows.append({"instruction": "Say it.", "input": "", "output": "Ok."})  # too short
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    cfg = streamed_config(
        tmp_path, tiny_base, str(data), "train.steps=5", "data.languages=[en]",
        "data.min_tokens=20",
    )  # fmt: skip
    loader = StreamLoader(
        cfg.data, tokenizer, 256, 0, batch_size=1, rank=0, world_size=1, packed=False,
        collate=lambda batch: [tokenizer.decode(r["input_ids"]) for r in batch],
    )  # fmt: skip
    seen = []
    for batch in loader:
        if loader.epoch > 0:
            break
        seen += batch
    assert sorted(
        text.split("\n")[-1].removesuffix(tokenizer.eos_token) for text in seen
    ) == sorted(english)


def test_near_duplicates_are_refused_with_streaming(tiny_base: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not with data.streaming"):
        streamed_config(tmp_path, tiny_base, "x.jsonl", "train.steps=3", "data.near_duplicates=0.8")


def test_a_stream_position_from_another_layout_is_refused(
    tokenizer: Any, tiny_base: Path, tmp_path: Path
) -> None:
    from bigft.data.streaming import StreamLoader

    cfg = streamed_config(tmp_path, tiny_base, "x.jsonl", "train.steps=3")

    def loader(world: int) -> StreamLoader:
        return StreamLoader(
            cfg.data, tokenizer, 64, 0, batch_size=2, rank=0, world_size=world, packed=True,
            collate=list,
        )  # fmt: skip

    saved = loader(2).state_dict()
    with pytest.raises(DataError, match="resume a streamed run with the same ones") as info:
        loader(1).load_state_dict(saved)
    assert "\n" not in str(info.value)
    loader(2).load_state_dict(saved)  # the same layout resumes
