"""`bigft data prepare` and the prepared-data store: prepared once, reused by training,
shared by processes started together, never used half-written."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bigft.commands import app
from bigft.config_io import load_config
from bigft.data.prepared import fingerprint, prepared_for_task, store_dir
from bigft.errors import DataError
from bigft.loop.setup import setup
from bigft.model.load import load_tokenizer
from tests.helpers import alpaca_rows, write_config, write_jsonl


def _config(tmp_path: Path, tiny_base: Path, *overrides: str) -> tuple[Path, Any]:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(data, alpaca_rows(64))
    path = write_config(tmp_path / "cfg.yaml", tiny_base, data)
    store = f"data.prepared_dir={tmp_path / 'store'}"
    return path, load_config(path, [store, f"output_dir={tmp_path / 'out'}", *overrides])


def _prepare_cli(path: Path, tmp_path: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bigft",
        "data",
        "prepare",
        str(path),
        f"data.prepared_dir={tmp_path / 'store'}",
    ]


def _entries(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir())


def test_prepared_once_then_training_reuses_it(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, cfg = _config(tmp_path, tiny_base)
    args = ["data", "prepare", str(path), f"data.prepared_dir={tmp_path / 'store'}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "data: prepared into" in result.output and "data (seq_len 64)" in result.output
    (digest,) = _entries(tmp_path / "store")
    prepared = tmp_path / "store" / digest
    expected = {"train", "validation", "stats.json", "train_plan.npz"}
    assert {p.name for p in prepared.iterdir()} >= expected

    def no_tokenizing(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the data was prepared again")

    def no_bin_packing(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the rows were packed again: the stored plan was not used")

    monkeypatch.setattr("bigft.data.labeled.prepare_data", no_tokenizing)
    monkeypatch.setattr("bigft.data.packing.bin_pack", no_bin_packing)
    run = setup(cfg)
    assert run.data_source.startswith(f"data: reused from {prepared} (")
    # The rows training reads are the prepared ones, memory-mapped from the store.
    files = {Path(f["filename"]).parent.parent for f in run.data.train.cache_files}
    assert files == {prepared}
    assert (
        len(run.data.train)
        == json.loads((prepared / "stats.json").read_text())["splits"]["train"]["rows_kept"]
    )


def test_the_store_defaults_to_the_datasets_cache(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, cfg = _config(tmp_path, tiny_base)
    assert store_dir(cfg.data) == tmp_path / "store"
    cfg.data.prepared_dir = None
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    assert store_dir(cfg.data) == tmp_path / "hf" / "bigft-prepared"


def test_the_fingerprint_follows_what_the_rows_depend_on(tiny_base: Path, tmp_path: Path) -> None:
    _, cfg = _config(tmp_path, tiny_base)
    tokenizer = load_tokenizer(cfg.model)

    def digest(c: Any = cfg, tok: Any = tokenizer) -> str:
        return fingerprint(c.data, tok, c.train.seq_len, c.train.seed, c.task)

    base = digest()
    assert digest() == base
    same = cfg.model_copy(deep=True)
    same.data.num_proc, same.data.shuffle = 4, False  # how, not what
    assert digest(same) == base
    changed = []
    for field, value in (("seq_len", 32), ("seed", 1)):
        other = cfg.model_copy(deep=True)
        setattr(other.train, field, value)
        changed.append(digest(other))
    other = cfg.model_copy(deep=True)
    other.data.completion_only = False
    changed.append(digest(other))
    other_tok = load_tokenizer(cfg.model)
    other_tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    changed.append(digest(tok=other_tok))
    data = Path(cfg.data.train_files[0])
    data.write_text(data.read_text() + json.dumps(alpaca_rows(1, seed=9)[0]) + "\n")
    changed.append(digest())
    assert len({base, *changed}) == len(changed) + 1


def test_processes_started_together_prepare_once(tiny_base: Path, tmp_path: Path) -> None:
    path, _ = _config(tmp_path, tiny_base)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    procs = [
        subprocess.Popen(
            _prepare_cli(path, tmp_path),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    prepared = [o for o in outputs if "data: prepared into" in o]
    others = [o for o in outputs if "by another process" in o or "reused from" in o]
    assert len(prepared) == 1 and len(others) == 1, outputs
    assert len(_entries(tmp_path / "store")) == 1  # one preparation, no lock or temp left


def test_a_waiting_process_prepares_once_the_holder_lets_go(
    tiny_base: Path, tmp_path: Path
) -> None:
    """A live holder's lock is waited on (a file, not a collective), then taken."""
    path, cfg = _config(tmp_path, tiny_base)
    digest = fingerprint(
        cfg.data, load_tokenizer(cfg.model), cfg.train.seq_len, cfg.train.seed, cfg.task
    )
    store = tmp_path / "store"
    store.mkdir()
    lock = store / f"{digest}.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": 0}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    proc = subprocess.Popen(
        _prepare_cli(path, tmp_path),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(8)
    assert proc.poll() is None  # still waiting on the live holder
    assert not (store / digest).exists()
    lock.unlink()
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert "data: prepared into" in output and (store / digest / "train").is_dir()


def test_a_dead_holder_and_its_half_written_folder_are_cleared(
    tiny_base: Path, tmp_path: Path
) -> None:
    _, cfg = _config(tmp_path, tiny_base)
    tokenizer = load_tokenizer(cfg.model)
    digest = fingerprint(cfg.data, tokenizer, cfg.train.seq_len, cfg.train.seed, cfg.task)
    store = tmp_path / "store"
    store.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    host = socket.gethostname()
    (store / f"{digest}.lock").write_text(json.dumps({"host": host, "pid": gone.pid}))
    half = store / f".{digest}.tmp-{host}-{gone.pid}"
    (half / "train").mkdir(parents=True)
    (store / "notes.txt").write_text("mine")  # not bigft's: left alone
    data, _, preparation = prepared_for_task(cfg, tokenizer)
    assert preparation.outcome == "prepared" and preparation.path == store / digest
    assert _entries(store) == [digest, "notes.txt"]
    assert len(data.train) > 0


def test_an_unreadable_preparation_says_what_to_do(tiny_base: Path, tmp_path: Path) -> None:
    _, cfg = _config(tmp_path, tiny_base)
    tokenizer = load_tokenizer(cfg.model)
    _, _, preparation = prepared_for_task(cfg, tokenizer)
    assert preparation.path is not None
    (preparation.path / "stats.json").write_text("{not json")
    with pytest.raises(DataError, match=r"cannot be read .*delete that folder"):
        prepared_for_task(cfg, tokenizer)


def test_without_the_cache_nothing_is_written(tiny_base: Path, tmp_path: Path) -> None:
    path, cfg = _config(tmp_path, tiny_base, "data.cache=false")
    _, _, preparation = prepared_for_task(cfg, load_tokenizer(cfg.model))
    assert preparation.outcome == "in memory" and not (tmp_path / "store").exists()
    result = CliRunner().invoke(app, ["data", "prepare", str(path), "data.cache=false"])
    assert result.exit_code != 0 and "data.cache is false" in result.output


def test_prune_removes_only_old_preparations_bigft_wrote(tiny_base: Path, tmp_path: Path) -> None:
    """`bigft data prune`: lists first and removes with --yes; a preparation a run reused
    counts as used then; a locked one, foreign files and folders that are not whole
    preparations stay; the next run prepares again."""
    path, _ = _config(tmp_path, tiny_base)
    store = tmp_path / "store"
    prepare = ["data", "prepare", str(path), f"data.prepared_dir={store}"]
    assert CliRunner().invoke(app, prepare).exit_code == 0
    (digest,) = _entries(store)
    foreign = [store / "notes.txt", store / "0123456789abcdef0123", store / "mine"]
    foreign[0].write_text("the user's")
    foreign[1].mkdir()  # a fingerprint's name, but no preparation in it
    foreign[2].mkdir()
    month_ago = time.time() - 40 * 86400
    os.utime(store / digest, (month_ago, month_ago))

    prune = ["data", "prune", str(path), f"data.prepared_dir={store}", "--unused-days", "30"]
    listed = CliRunner().invoke(app, prune)
    assert listed.exit_code == 0, listed.output
    assert f"remove {digest}" in listed.output and "run again with --yes" in listed.output
    assert all(f"skip   {p.name}" in listed.output for p in foreign)
    assert (store / digest).is_dir()  # only listed

    reused = CliRunner().invoke(app, prepare)  # a run reusing it marks it used
    assert "data: reused from" in reused.output
    assert f"keep   {digest}" in CliRunner().invoke(app, prune).output

    os.utime(store / digest, (month_ago, month_ago))
    (store / f"{digest}.lock").write_text("{}")  # being read or written right now
    locked = CliRunner().invoke(app, [*prune, "--yes"])
    assert f"locked {digest}" in locked.output and (store / digest).is_dir()

    (store / f"{digest}.lock").unlink()
    removed = CliRunner().invoke(app, [*prune, "--yes"])
    assert removed.exit_code == 0, removed.output
    assert "removed 1 preparation(s)" in removed.output
    assert _entries(store) == sorted(p.name for p in foreign)
    assert foreign[0].read_text() == "the user's"
    again = CliRunner().invoke(app, prepare)
    assert "data: prepared into" in again.output and (store / digest).is_dir()


def test_prune_mistakes_are_one_line(tmp_path: Path) -> None:
    for args, message in (
        (["--unused-days", "-1"], "give 0 or more days"),
        ([str(tmp_path / "cfg.yaml"), "--store", str(tmp_path)], "not both"),
    ):
        result = CliRunner().invoke(app, ["data", "prune", *args])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
