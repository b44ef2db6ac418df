"""Text augmentation (data.augment.text): the EDA operations, synonyms, determinism, the
training split only, every row shape, the prepared-data cache, back-translation through
two tiny seq2seq models made here, and the errors."""

from __future__ import annotations

import io
import json
import re
import sys
import types
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from bigft.config import DataConfig, TextAugmentConfig
from bigft.config_io import load_config
from bigft.data import prepare_data
from bigft.data.augment_text import (
    Synonyms,
    TextAugmenter,
    load_synonyms,
    random_deletion,
    random_insertion,
    random_swap,
    synonym_replacement,
)
from bigft.data.formats import IGNORE_INDEX
from bigft.data.labeled import prepare_labeled
from bigft.data.prepared import prepared_for_task
from bigft.data.preview import preview, removal_report
from bigft.errors import ConfigError
from tests.helpers import write_config, write_jsonl

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
SPLIT = {"train": 0.7, "validation": 0.2, "test": 0.1}
ALL_TRAIN = {"train": 1.0, "validation": 0.0, "test": 0.0}
SYNONYMS = "quick, fast, rapid\nwrite, compose, produce\nanswer, reply, response\nplease, kindly\n"


def table() -> Synonyms:
    return Synonyms({w: [w.upper() + "x"] for w in WORDS})  # every word has one synonym


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# -- the operations ---------------------------------------------------------------------


def test_synonym_replacement_replaces_the_share_of_words_by_synonyms_from_the_table() -> None:
    text = " ".join(WORDS) + "."
    for seed in range(5):
        out = synonym_replacement(text, 0.3, table(), rng(seed)).rstrip(".").split()
        changed = [(a, b) for a, b in zip(WORDS, out, strict=True) if a != b]
        assert len(changed) == 3  # round(0.3 * 10)
        assert all(b == a.upper() + "x" for a, b in changed)
    # punctuation and case stay with the token; words without a synonym are left alone
    syn = Synonyms({"dog": ["hound"]})
    assert synonym_replacement("The Dog, the cat.", 1.0, syn, rng()) == "The Hound, the cat."
    assert synonym_replacement("no synonyms here", 1.0, syn, rng()) == "no synonyms here"


def test_random_insertion_inserts_synonyms_of_the_texts_words() -> None:
    text = " ".join(WORDS) + "."
    for seed in range(5):
        out = random_insertion(text, 0.2, table(), rng(seed))
        assert out.endswith(".")  # nothing after the last word
        words = out.rstrip(".").split()
        assert len(words) == 12  # two inserted
        inserted = [w for w in words if w not in WORDS]
        assert len(inserted) == 2 and all(w.lower()[:-1] in WORDS for w in inserted)
        assert [w for w in words if w in WORDS] == WORDS  # the originals, in order


def test_random_swap_swaps_words_and_keeps_punctuation_in_place() -> None:
    text = "alpha, beta gamma delta epsilon zeta eta theta iota kappa!"
    for seed in range(5):
        out = random_swap(text, 0.1, rng(seed))  # one swap
        assert out.endswith("!") and out.count(",") == 1 and out.split()[0].endswith(",")
        a = text.replace(",", "").rstrip("!").split()
        b = out.replace(",", "").rstrip("!").split()
        assert sorted(a) == sorted(b)
        assert sum(x != y for x, y in zip(a, b, strict=True)) == 2
    assert random_swap("single", 1.0, rng()) == "single"


def test_random_deletion_deletes_about_p_of_the_words_never_all() -> None:
    words = [f"w{i}" for i in range(400)]
    out = random_deletion(" ".join(words), 0.5, rng()).split()
    assert 140 <= len(out) <= 260  # binomial(400, 0.5): 200 +- 10 sd
    assert out == [w for w in words if w in set(out)]  # the survivors, in order
    for seed in range(5):
        one = random_deletion("alpha beta gamma.", 1.0, rng(seed))
        assert len(one.split()) == 1 and one.endswith(".")  # the closing mark stays
    # the line break between two kept words stays
    for seed in range(10):
        out2 = random_deletion("a b c\nd e f", 0.5, rng(seed))
        top, _, bottom = out2.partition("\n")
        if any(w in out2 for w in "abc") and any(w in out2 for w in "def"):
            assert set(top.split()) <= set("abc") and set(bottom.split()) <= set("def")


def test_synonyms_files_text_groups_and_json(tmp_path: Path) -> None:
    groups = tmp_path / "syn.txt"
    groups.write_text("# comment\nquick, fast, rapid\nbig large\n")
    syn = load_synonyms(str(groups))
    assert syn.of("Quick") == ["fast", "rapid"] and syn.of("large") == ["big"]
    assert syn.of("slow") == []
    mapping = tmp_path / "syn.json"
    mapping.write_text(json.dumps({"Dog": ["hound", "dog", "canine"]}))
    assert load_synonyms(str(mapping)).of("dog") == ["hound", "canine"]
    mapping.write_text(json.dumps(["not", "a", "mapping"]))
    with pytest.raises(ConfigError, match=r"data.augment.text.synonyms: .*JSON object"):
        load_synonyms(str(mapping))
    with pytest.raises(ConfigError, match=r"data.augment.text.synonyms: .*not found"):
        load_synonyms(str(tmp_path / "missing.txt"))


def test_wordnet_without_nltk_or_its_corpus_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = TextAugmentConfig(synonym_replacement=0.2, synonyms="wordnet")
    monkeypatch.setitem(sys.modules, "nltk", None)  # an import of nltk fails
    monkeypatch.setitem(sys.modules, "nltk.corpus", None)
    with pytest.raises(ConfigError) as err:
        TextAugmenter(cfg, 0)
    message = str(err.value)
    assert "\n" not in message
    assert "pip install 'bigft[nlp]'" in message and "python -m nltk.downloader wordnet" in message

    # nltk there, but not its corpus; then both, through a stand-in for the corpus reader
    class Lemma:
        def __init__(self, name: str) -> None:
            self._name = name

        def name(self) -> str:
            return self._name

    class WordNet:
        loaded = False

        def ensure_loaded(self) -> None:
            if not self.loaded:
                raise LookupError("Resource wordnet not found")

        def synsets(self, word: str) -> list[Any]:
            found = {"quick": [["quick", "speedy"], ["flying_start"]], "the": [["thee"]]}
            groups = found.get(word, [])
            return [types.SimpleNamespace(lemmas=lambda g=g: [Lemma(n) for n in g]) for g in groups]

    corpus = types.ModuleType("nltk.corpus")
    corpus.wordnet = WordNet()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nltk", types.ModuleType("nltk"))
    monkeypatch.setitem(sys.modules, "nltk.corpus", corpus)
    with pytest.raises(ConfigError, match="python -m nltk.downloader wordnet"):
        TextAugmenter(cfg, 0)
    WordNet.loaded = True
    syn = TextAugmenter(cfg, 0).synonyms
    assert syn is not None
    assert syn.of("quick") == ["speedy", "flying start"] and syn.of("the") == []  # stop word


# -- determinism ------------------------------------------------------------------------


def test_copies_are_deterministic_per_seed_and_row_not_per_batch(tmp_path: Path) -> None:
    (tmp_path / "syn.txt").write_text(SYNONYMS)
    cfg = TextAugmentConfig(
        copies=3,
        synonym_replacement=0.3,
        random_swap=0.2,
        random_deletion=0.2,
        synonyms=str(tmp_path / "syn.txt"),
    )
    rows = [[f"please write the quick answer number {i} for me"] for i in range(8)]
    keys = [(0, i) for i in range(8)]
    first = TextAugmenter(cfg, 7).augment(rows, keys)
    assert TextAugmenter(cfg, 7).augment(rows, keys) == first
    assert TextAugmenter(cfg, 8).augment(rows, keys) != first
    alone = TextAugmenter(cfg, 7).augment(rows[5:6], keys[5:6])
    assert alone[0] == first[5]  # the same copies whatever rows come with it
    assert all(1 <= len(c) <= 3 for c in first)  # copies equal to the row are skipped
    assert all(new != row for c, row in zip(first, rows, strict=True) for _, new in c)


# -- causal_lm --------------------------------------------------------------------------


def _alpaca(i: int) -> dict[str, str]:
    return {
        "instruction": f"Please write the quick answer for item {i}.",
        "input": f"item {i} is quick" if i % 2 else "",
        "output": f"The answer is {i}.",
    }


def _augment(tmp_path: Path, **values: Any) -> dict[str, Any]:
    (tmp_path / "syn.txt").write_text(SYNONYMS)
    return {"text": {"synonyms": str(tmp_path / "syn.txt"), **values}}


def _decoded(tokenizer: Any, ds: Any) -> list[tuple[str, str]]:
    """(prompt, target) text of each row."""
    out = []
    for ids, labels in zip(ds["input_ids"], ds["labels"], strict=True):
        prompt = [t for t, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX]
        target = [t for t in labels if t != IGNORE_INDEX]
        out.append((tokenizer.decode(prompt[1:]), tokenizer.decode(target)))
    return out


def test_alpaca_augments_the_prompt_of_training_rows_only(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [_alpaca(i) for i in range(30)])
    plain = DataConfig(train=str(path), prompt_template="short", split=SPLIT)
    base = prepare_data(plain, tokenizer, 128, seed=3)
    augment = _augment(tmp_path, copies=2, synonym_replacement=0.3, random_swap=0.2)
    cfg = DataConfig(train=str(path), prompt_template="short", split=SPLIT, augment=augment)
    data = prepare_data(cfg, tokenizer, 128, seed=3)
    stats = data.stats.splits["train"]

    # validation and test: the very same rows
    for name in ("validation", "test"):
        assert getattr(data, name)["input_ids"] == getattr(base, name)["input_ids"]
    # train: the originals, then stats.augmented new rows, each with an original's target
    assert 0 < stats.augmented <= 2 * len(base.train)
    assert len(data.train) == len(base.train) + stats.augmented
    assert data.train["input_ids"][: len(base.train)] == base.train["input_ids"]
    originals = dict((t, p) for p, t in _decoded(tokenizer, base.train))
    added = _decoded(tokenizer, data.train)[len(base.train) :]
    assert all(t in originals and p != originals[t] for p, t in added)  # only prompts change
    # no augmented row is, or comes from, a validation / test row (checked by content)
    held_out = {
        t for name in ("validation", "test") for _, t in _decoded(tokenizer, getattr(base, name))
    }
    assert not held_out & {t for _, t in added}
    assert len(stats.augmented_examples) == 5
    assert stats.augmented_examples[0]["fields"] == ["instruction", "input"]

    console = Console(file=io.StringIO(), width=200)
    preview(data, tokenizer, console, n=2)
    shown = console.file.getvalue()  # type: ignore[attr-defined]
    assert f"{stats.augmented} rows added to train" in shown
    assert "original" in shown and re.search(r"copy 1 \((synonym_replacement|random_swap)\)", shown)
    assert str(removal_report("train", stats)[0]).startswith(f"added to train: {stats.augmented}")

    again = prepare_data(cfg, tokenizer, 128, seed=3)
    assert again.train["input_ids"] == data.train["input_ids"]
    other = prepare_data(cfg, tokenizer, 128, seed=4)
    assert other.train["input_ids"] != data.train["input_ids"]


def test_num_proc_does_not_change_the_rows(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [_alpaca(i) for i in range(12)])
    augment = _augment(tmp_path, copies=2, random_deletion=0.3, random_swap=0.2)
    rows = [
        prepare_data(
            DataConfig(
                train=str(path),
                prompt_template="short",
                split=SPLIT,
                num_proc=n,
                cache=False,
                augment=augment,
            ),
            tokenizer,
            128,
            seed=0,
        ).train["input_ids"]
        for n in (1, 2)
    ]
    assert rows[0] == rows[1]


def test_chat_changes_user_turns_only_and_text_the_whole_text(
    tmp_path: Path, tokenizer: Any
) -> None:
    system, reply = "You are quick to answer.", "The quick answer is yes."
    chats = [
        {
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Please write the quick answer {i}."},
                {"role": "assistant", "content": reply},
            ]
        }
        for i in range(6)
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", chats)
    augment = _augment(tmp_path, synonym_replacement=1.0)
    cfg = DataConfig(train=str(path), format="chat", split=ALL_TRAIN, augment=augment)
    data = prepare_data(cfg, tokenizer, 256, seed=0)
    assert data.stats.splits["train"].augmented == 6
    for ids in data.train["input_ids"][6:]:
        text = tokenizer.decode(ids)
        assert system in text and reply in text  # system and assistant turns as they were
        assert "Please write the quick answer" not in text  # every user word was replaced
        assert re.search(r"(Kindly) (compose|produce) the (fast|rapid) (reply|response)", text)

    texts = [{"text": f"please write the quick answer number {i} now"} for i in range(6)]
    path = write_jsonl(tmp_path / "text.jsonl", texts)
    augment = _augment(tmp_path, random_deletion=0.5)
    cfg = DataConfig(train=str(path), format="text", split=ALL_TRAIN, augment=augment)
    data = prepare_data(cfg, tokenizer, 256, seed=0)
    for ids in data.train["input_ids"][6:]:
        words = tokenizer.decode(ids, skip_special_tokens=True).split()
        assert 1 <= len(words) < 8  # words deleted from the (only) text


def test_prepared_store_reuses_and_refreshes_on_a_new_synonyms_file(
    tmp_path: Path, tiny_base: Path, tokenizer: Any
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", [_alpaca(i) for i in range(20)])
    (tmp_path / "syn.txt").write_text(SYNONYMS)
    augment = {"text": {"synonyms": "syn.txt", "synonym_replacement": 0.5}}  # relative
    path = write_config(tmp_path / "cfg.yaml", tiny_base, data, data={"augment": augment})
    cfg = load_config(path, [f"data.prepared_dir={tmp_path / 'store'}"])
    assert cfg.data.augment.text and cfg.data.augment.text.synonyms == str(tmp_path / "syn.txt")
    first, _, prep = prepared_for_task(cfg, tokenizer)
    again, _, reuse = prepared_for_task(cfg, tokenizer)
    assert (prep.outcome, reuse.outcome) == ("prepared", "reused") and prep.path == reuse.path
    assert again.train["input_ids"] == first.train["input_ids"]
    assert again.stats.splits["train"].augmented == first.stats.splits["train"].augmented > 0
    (tmp_path / "syn.txt").write_text(SYNONYMS.replace("quick, fast, rapid", "quick, swift"))
    changed, _, redo = prepared_for_task(cfg, tokenizer)
    assert redo.outcome == "prepared" and redo.path != prep.path
    assert changed.train["input_ids"] != first.train["input_ids"]


# -- classification ---------------------------------------------------------------------


def test_classification_augments_text_and_pair_with_labels_unchanged(
    tmp_path: Path, tokenizer: Any
) -> None:
    rows = [
        {"text": f"please write the quick answer {i}", "pair": f"answer {i}", "label": f"c{i % 3}"}
        for i in range(20)
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    fields = {"text_pair_field": "pair", "split": SPLIT, "format": "text"}
    plain = DataConfig(train=str(path), **fields)
    base, names = prepare_labeled(plain, tokenizer, 64, 0, "classification")
    augment = _augment(tmp_path, copies=2, synonym_replacement=0.5)
    data, names2 = prepare_labeled(
        DataConfig(train=str(path), augment=augment, **fields), tokenizer, 64, 0, "classification"
    )
    assert names == names2 and data.train.column_names == base.train.column_names
    assert sorted(data.train.column_names) == ["input_ids", "label"]
    for name in ("validation", "test"):
        assert getattr(data, name)[:] == getattr(base, name)[:]
    added = data.stats.splits["train"].augmented
    assert added > 0 and len(data.train) == len(base.train) + added
    # the number in the text (no synonyms) ties each copy to its row: same label
    label_of = {}
    for ids, label in zip(base.train["input_ids"], base.train["label"], strict=True):
        label_of[re.findall(r"\d+", tokenizer.decode(ids))[0]] = label
    new = list(zip(data.train["input_ids"], data.train["label"], strict=True))[len(base.train) :]
    for ids, label in new:
        text = tokenizer.decode(ids, skip_special_tokens=True)
        assert label_of[re.findall(r"\d+", text)[0]] == label
        assert "quick" not in text or "answer" not in text  # half the words replaced
    assert Counter(data.train["label"]) != Counter(base.train["label"])


# -- back-translation -------------------------------------------------------------------


def _seq2seq(out: Path, seed: int) -> Path:
    """A tiny random BART with the character tokenizer, saved the way users save one."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    from bigft.tiny import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
        init_std=0.5,  # large random weights: outputs that depend on the input
    )
    torch.manual_seed(seed)
    BartForConditionalGeneration(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_back_translation_runs_deterministically_on_train_only(
    tmp_path: Path, tokenizer: Any
) -> None:
    forward, backward = _seq2seq(tmp_path / "fwd", 0), _seq2seq(tmp_path / "bwd", 1)
    path = write_jsonl(tmp_path / "train.jsonl", [_alpaca(i) for i in range(12)])
    bt = {"forward": str(forward), "backward": str(backward), "max_new_tokens": 12}
    augment = {"text": {"back_translation": {**bt, "batch_size": 4}}}
    plain = DataConfig(train=str(path), prompt_template="short", split=SPLIT)
    cfg = DataConfig(train=str(path), prompt_template="short", split=SPLIT, augment=augment)
    base = prepare_data(plain, tokenizer, 128, seed=0)
    data = prepare_data(cfg, tokenizer, 128, seed=0)
    stats = data.stats.splits["train"]
    # one paraphrase per row (junk, but new), unless the models' junk is blank for each text
    # of a row (a blank text is left as it was, and a copy equal to its row is skipped)
    assert len(base.train) // 2 <= stats.augmented <= len(base.train)
    assert {c["technique"] for e in stats.augmented_examples for c in e["copies"]} == {
        "back_translation"
    }
    for name in ("validation", "test"):
        assert getattr(data, name)["input_ids"] == getattr(base, name)["input_ids"]
    targets = {t for _, t in _decoded(tokenizer, base.train)}
    assert {t for _, t in _decoded(tokenizer, data.train)} == targets  # outputs unchanged
    # another batch size, another run: the same paraphrases
    other = {"text": {"back_translation": {**bt, "batch_size": 1}}}
    again = prepare_data(
        DataConfig(train=str(path), prompt_template="short", split=SPLIT, augment=other),
        tokenizer,
        128,
        seed=0,
    )
    assert again.train["input_ids"] == data.train["input_ids"]


def test_missing_or_broken_model_directories_name_their_key(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    good = _seq2seq(tmp_path / "good", 0)
    for forward, backward, key in (
        (broken, good, "forward"),
        (good, tmp_path / "missing", "backward"),
    ):
        cfg = TextAugmentConfig(
            back_translation={"forward": str(forward), "backward": str(backward)}
        )
        with pytest.raises(ConfigError) as err:
            TextAugmenter(cfg, 0)
        assert str(err.value).startswith(f"data.augment.text.back_translation.{key}: ")
        assert "\n" not in str(err.value)


# -- config -----------------------------------------------------------------------------


def test_config_paths_streaming_and_no_technique(
    tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_jsonl(tmp_path / "conf" / "train.jsonl", [_alpaca(i) for i in range(4)])
    text = {
        "synonyms": "syn.txt",
        "synonym_replacement": 0.1,
        "back_translation": {"forward": "models/fwd", "backward": "/abs/bwd"},
    }
    path = write_config(
        tmp_path / "conf" / "cfg.yaml", tiny_base, data, data={"augment": {"text": text}}
    )
    cfg = load_config(path, [])
    aug = cfg.data.augment.text
    assert aug is not None and aug.back_translation is not None
    assert aug.synonyms == str(tmp_path / "conf" / "syn.txt")
    assert aug.back_translation.forward == str(tmp_path / "conf" / "models" / "fwd")
    assert aug.back_translation.backward == "/abs/bwd"
    monkeypatch.chdir(tmp_path)
    # (a key below an optional section is set by merging a mapping into it)
    cfg = load_config(path, ["data.augment.text={synonyms: here.txt}"])  # working directory
    assert cfg.data.augment.text and cfg.data.augment.text.synonyms == str(tmp_path / "here.txt")
    cfg = load_config(path, ["data.augment.text={synonyms: wordnet}"])
    assert cfg.data.augment.text and cfg.data.augment.text.synonyms == "wordnet"

    with pytest.raises(ConfigError, match=r"data.augment.text.*not with data.streaming"):
        load_config(path, ["data.streaming=true", "train.steps=5"])
    with pytest.raises(ConfigError, match="enables no technique"):
        load_config(path, ["data.augment.text={synonym_replacement: 0, back_translation: null}"])


def test_a_mixture_augments_each_source_by_its_own_format(tmp_path: Path, tokenizer: Any) -> None:
    from bigft.data.mixture import SOURCE

    texts = write_jsonl(
        tmp_path / "text.jsonl", [{"body": f"write the quick answer {i}"} for i in range(5)]
    )
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [_alpaca(i) for i in range(5)])
    sources = [
        {"path": str(texts), "format": "text", "text_field": "body"},
        {"path": str(alpaca), "format": "alpaca"},
    ]
    augment = _augment(tmp_path, synonym_replacement=1.0)
    cfg = DataConfig(train=sources, prompt_template="short", split=ALL_TRAIN, augment=augment)
    data = prepare_data(cfg, tokenizer, 128, seed=0)
    assert data.stats.splits["train"].augmented == 10  # every row has replaceable words
    ids = data.train[SOURCE]
    assert ids[:10] == [0] * 5 + [1] * 5 and sorted(ids[10:]) == [0] * 5 + [1] * 5
    for row, source in zip(data.train.select(range(10, 20)), ids[10:], strict=True):
        text = tokenizer.decode(row["input_ids"], skip_special_tokens=True)
        assert "quick" not in text.split("The answer is")[0]  # the prompt side / the text
        assert ("The answer is" in text) == (source == 1)  # each source kept its format


def test_prepare_data_refuses_augmentation_of_a_stream(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [_alpaca(i) for i in range(4)])
    augment = _augment(tmp_path, random_swap=0.5)
    cfg = DataConfig(train=str(path), split=ALL_TRAIN, streaming=True, augment=augment)
    with pytest.raises(ConfigError, match="not with data.streaming"):
        prepare_data(cfg, tokenizer, 128, seed=0)
