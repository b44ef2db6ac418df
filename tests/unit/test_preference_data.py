"""Preference data (task preference) against real-shaped tokenizers: each sequence is SFT's
row for prompt + completion, chosen and rejected share the prompt's ids exactly, only the
completion (with its end-of-turn) is a target, and the batch holds 2B rows.

The tokenizers are trained here with the `tokenizers` library: a byte-level BPE with a
ChatML template (Qwen-style: end of turn `<|im_end|>`, eos `<|endoftext|>`, no bos) and a
Metaspace (SentencePiece-style) BPE with the Llama-2 `[INST]` template (bos `<s>`, a
turn ends with ` </s>`). They learn on rendered conversations, so merges across turn
boundaries exist (Llama-2's "[/INST]" + " reply" becomes "▁reply").
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from bigft.config import Config, DataConfig, PreferenceConfig
from bigft.data.formats import IGNORE_INDEX, FormatSpec, Formatter
from bigft.data.labeled import make_collator, prepare_for_task
from bigft.data.pipeline import prepare_data
from bigft.data.preference import PreferenceCollator, prepare_preference_data
from bigft.data.prepared import fingerprint
from bigft.errors import DataError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

SYSTEM = {"role": "system", "content": "Réponds brièvement."}
ROWS: list[dict[str, Any]] = [
    {
        "prompt": [SYSTEM, {"role": "user", "content": "Capitale du Japon ?"}],
        "chosen": "Tōkyō (東京).",
        "rejected": "Kyōto, je crois.",
    },
    {  # a multi-turn prompt: its assistant turn is context, not a target
        "prompt": [
            {"role": "user", "content": "What's 6 × 7?"},
            {"role": "assistant", "content": "42."},
            {"role": "user", "content": "And naïve café prices, in €?"},
        ],
        "chosen": "About 2,50 € — “cheap”!",
        "rejected": "No idea.",
    },
    {
        "prompt": [{"role": "user", "content": "Say hello to the world."}],
        "chosen": "hello world!",
        "rejected": "bye",
    },
]
WORDS = "the a cat dog sat on mat café naïve hello world bye No idea About cheap 42 Tōkyō Kyōto"


def corpus(template: str, bos: str, eos: str) -> list[str]:
    from transformers.utils.chat_template_utils import render_jinja_template

    rng = random.Random(0)
    words = WORDS.split(" ")
    texts = [" ".join(rng.choices(words, k=rng.randint(3, 10))) for _ in range(200)]
    chats = [full_conversation(r, key) for r in ROWS for key in ("chosen", "rejected")]
    rendered, _ = render_jinja_template(
        conversations=chats, chat_template=template, bos_token=bos, eos_token=eos
    )
    return texts + rendered * 10


def chatml_bpe() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(CHATML, "", "<|endoftext|>"), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
        clean_up_tokenization_spaces=False,
    )


def llama2_metaspace() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    metaspace = {"replacement": "▁", "prepend_scheme": "first", "split": True}
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.Metaspace(**metaspace)]
    )
    backend.decoder = decoders.Metaspace(**metaspace)
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    backend.train_from_iterator(corpus(LLAMA2, "<s>", "</s>"), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        chat_template=LLAMA2,
        clean_up_tokenization_spaces=False,
    )


# name -> (tokenizer, what a reply's targets decode to: SFT's span of the turn)
STYLES = {
    "chatml-bytelevel": (chatml_bpe, lambda reply: reply + "<|im_end|>"),
    "llama2-metaspace": (llama2_metaspace, lambda reply: reply.strip() + " </s>"),
}


@pytest.fixture(scope="module", params=list(STYLES))
def style(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    make, target = STYLES[request.param]
    return make(), target


@pytest.fixture(scope="module")
def chatml() -> Any:
    return chatml_bpe()


def write(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def data_cfg(train: str, **extra: Any) -> DataConfig:
    split = {"train": 1.0, "validation": 0.0, "test": 0.0}
    return DataConfig(train=train, split=split, cache=False, **{"format": "chat", **extra})


def prepare(
    tmp_path: Path, rows: list[dict[str, Any]], tokenizer: Any, seq_len: int = 256, **kw: Any
) -> Any:
    pref = PreferenceConfig(**kw.pop("pref", {}))
    path = write(tmp_path / "pairs.jsonl", rows)
    return prepare_preference_data(data_cfg(path, **kw), pref, tokenizer, seq_len, 0)


def prompt_length(labels: list[int]) -> int:
    return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


def targets(tokenizer: Any, ids: list[int], labels: list[int]) -> str:
    """The one run of target tokens, decoded (template text after it is no target)."""
    start = prompt_length(labels)
    end = start
    while end < len(labels) and labels[end] != IGNORE_INDEX:
        end += 1
    assert set(labels[end:]) <= {IGNORE_INDEX}
    assert labels[start:end] == ids[start:end]
    return str(tokenizer.decode(ids[start:end], skip_special_tokens=False))


def full_conversation(row: dict[str, Any], key: str) -> list[dict[str, str]]:
    return [*row["prompt"], {"role": "assistant", "content": row[key]}]


LAYOUTS = {
    "reply strings": lambda r: r,
    "one-message replies": lambda r: {
        **r,
        "chosen": [{"role": "assistant", "content": r["chosen"]}],
        "rejected": [{"role": "assistant", "content": r["rejected"]}],
    },
    "full conversations with prompt": lambda r: {
        **r,
        "chosen": full_conversation(r, "chosen"),
        "rejected": full_conversation(r, "rejected"),
    },
    "full conversations, no prompt": lambda r: {
        "chosen": full_conversation(r, "chosen"),
        "rejected": full_conversation(r, "rejected"),
    },
    "UltraFeedback: string prompt, full conversations": lambda r: {
        "prompt": r["prompt"][-1]["content"],
        "chosen": full_conversation(r, "chosen"),
        "rejected": full_conversation(r, "rejected"),
    },
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pairs_share_the_prompt_ids_and_target_exactly_the_completion(
    tmp_path: Path, style: tuple[Any, Any], layout: str
) -> None:
    tokenizer, target = style
    data = prepare(tmp_path, [LAYOUTS[layout](r) for r in ROWS], tokenizer)
    assert list(data.train.column_names) == [
        "chosen_input_ids",
        "chosen_labels",
        "rejected_input_ids",
        "rejected_labels",
    ]
    assert len(data.train) == len(ROWS)
    for row, out in zip(ROWS, data.train, strict=True):
        chosen, rejected = out["chosen_input_ids"], out["rejected_input_ids"]
        p = prompt_length(out["chosen_labels"])
        assert p == prompt_length(out["rejected_labels"])
        assert chosen[:p] == rejected[:p]
        assert targets(tokenizer, chosen, out["chosen_labels"]) == target(row["chosen"])
        assert targets(tokenizer, rejected, out["rejected_labels"]) == target(row["rejected"])
        # The ids are the rendered conversation, as `apply_chat_template` gives them.
        rendered = tokenizer.apply_chat_template(full_conversation(row, "chosen"), tokenize=False)
        bos = (
            [tokenizer.bos_token_id]
            if tokenizer.bos_token and not rendered.startswith(tokenizer.bos_token)
            else []
        )
        assert chosen == bos + tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_chosen_sequence_is_the_sft_row_of_the_same_conversation(
    tmp_path: Path, style: tuple[Any, Any]
) -> None:
    """bigft's chat SFT pipeline on prompt + chosen gives the chosen sequence's ids; its
    labels agree on the last turn (SFT also trains on the prompt's assistant turns)."""
    tokenizer, _ = style
    pairs = prepare(tmp_path, ROWS, tokenizer)
    sft_file = write(
        tmp_path / "sft.jsonl", [{"messages": full_conversation(r, "chosen")} for r in ROWS]
    )
    sft = prepare_data(data_cfg(sft_file, packing=False), tokenizer, 256, 0)
    for pair, row in zip(pairs.train, sft.train, strict=True):
        assert pair["chosen_input_ids"] == row["input_ids"]
        p = prompt_length(pair["chosen_labels"])
        assert pair["chosen_labels"][p:] == row["labels"][p:]
    # The multi-turn prompt's "42." is a target in SFT, context here.
    labels = pairs.train[1]["chosen_labels"]
    p = prompt_length(labels)
    assert set(labels[:p]) == {IGNORE_INDEX}
    assert any(label != IGNORE_INDEX for label in sft.train[1]["labels"][:p])


@pytest.mark.parametrize("fmt", ["alpaca", "text", "chat"])
def test_text_rows_render_as_sft_renders_their_format(
    tmp_path: Path, style: tuple[Any, Any], fmt: str
) -> None:
    tokenizer, _ = style
    row = {"prompt": "Say hello to the world.", "chosen": "hello world!", "rejected": "bye"}
    out = prepare(tmp_path, [row], tokenizer, format=fmt, prompt_template="short").train[0]
    if fmt == "chat":
        user = [{"role": "user", "content": row["prompt"]}]
        spec, sft_row = (
            FormatSpec("chat"),
            {"messages": [*user, {"role": "assistant", "content": "hello world!"}]},
        )
    else:
        template = "short" if fmt == "alpaca" else "{instruction}"
        spec = FormatSpec("alpaca", prompt_template=template)
        sft_row = {"instruction": row["prompt"], "output": "hello world!"}
    ids, labels = Formatter(spec, tokenizer)(sft_row)
    assert out["chosen_input_ids"] == ids
    if fmt != "chat":  # alpaca: the reply's tokens and eos are the targets
        assert out["chosen_labels"] == labels
        eos = tokenizer.eos_token
        assert targets(tokenizer, ids, labels) in ("hello world!" + eos, " hello world!" + eos)
    if fmt == "text":
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        assert ids[: prompt_length(labels)] == bos + prompt


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_completion(
    tmp_path: Path,
) -> None:
    tokenizer = llama2_metaspace()
    long_prompt = " ".join(["the cat sat on the mat"] * 20)
    row = {
        "prompt": [{"role": "user", "content": long_prompt}],
        "chosen": "hello world!",
        "rejected": " ".join(["No idea"] * 30),
    }
    full = prepare(tmp_path, [row], tokenizer, seq_len=1024).train[0]
    seq_len = 48
    data = prepare(tmp_path, [row], tokenizer, seq_len=seq_len)
    out = data.train[0]
    assert data.stats.splits["train"].truncated == 1
    chosen, rejected = out["chosen_input_ids"], out["rejected_input_ids"]
    assert max(len(chosen), len(rejected)) == seq_len
    p = prompt_length(out["chosen_labels"])
    assert p == prompt_length(out["rejected_labels"]) and chosen[:p] == rejected[:p]
    assert p >= seq_len // 2  # the prompt keeps half of seq_len
    assert chosen[0] == tokenizer.bos_token_id  # bos stays; the cut is after it
    p_full = prompt_length(full["chosen_labels"])
    assert chosen[1:p] == full["chosen_input_ids"][p_full - (p - 1) : p_full]  # the prompt's end
    # chosen keeps its whole completion (eos included); rejected keeps its start.
    assert chosen[p:] == full["chosen_input_ids"][p_full:]
    kept = seq_len - p
    assert rejected[p:] == full["rejected_input_ids"][p_full : p_full + kept]
    assert out["chosen_labels"][p:] == chosen[p:]

    dropped = prepare(tmp_path, [row, ROWS[2]], tokenizer, seq_len=seq_len, overlong="drop")
    stats = dropped.stats.splits["train"]
    assert (stats.rows_loaded, stats.rows_kept, stats.dropped["too_long"]) == (2, 1, 1)
    assert stats.removed["too_long"][0]["location"].endswith("pairs.jsonl:1")


def test_kto_rows_carry_a_desirable_flag(tmp_path: Path, chatml: Any) -> None:
    def kto(labels: list[Any]) -> Any:
        rows = [
            {"prompt": r["prompt"], "completion": r["chosen"] + str(i), "label": label}
            for i, (r, label) in enumerate(zip(ROWS * 2, labels, strict=False))
        ]
        return rows, prepare(tmp_path, rows, chatml, pref={"loss": "kto"}).train

    rows, data = kto([True, False])
    assert data.column_names == ["input_ids", "labels", "desirable"]
    assert data["desirable"] == [True, False]
    out = data[0]
    assert targets(chatml, out["input_ids"], out["labels"]) == rows[0]["completion"] + "<|im_end|>"
    assert kto([1, 0, 0])[1]["desirable"] == [True, False, False]
    strings = ["true", "FALSE", " True ", "1", "0"]
    assert kto(strings)[1]["desirable"] == [True, False, True, True, False]


GOOD = ROWS[2]
BAD_ROWS = {
    "missing rejected": ({"prompt": "Hi.", "chosen": "Hello."}, "row has no 'rejected' field"),
    "empty completion": ({**GOOD, "chosen": "  "}, "'chosen' is an empty completion"),
    "chosen equals rejected": (
        {**GOOD, "rejected": GOOD["chosen"]},
        "'chosen' and 'rejected' are the same completion",
    ),
    "conversations differ before the reply": (
        {
            "chosen": full_conversation(ROWS[0], "chosen"),
            "rejected": full_conversation(ROWS[2], "rejected"),
        },
        "differ before their last assistant turn",
    ),
    "prompt ends with an assistant turn": (
        {**GOOD, "prompt": [*GOOD["prompt"], {"role": "assistant", "content": "Hm."}]},
        "ends with an assistant turn",
    ),
    "unknown role": (
        {**GOOD, "prompt": [{"role": "robot", "content": "Hi."}]},
        "'prompt': messages[0] has unknown role 'robot'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_a_bad_row_is_one_line_naming_file_and_line(tmp_path: Path, chatml: Any, case: str) -> None:
    bad, message = BAD_ROWS[case]
    path = tmp_path / "pairs.jsonl"
    rows = [GOOD, dict(GOOD, chosen="Hello!")] if isinstance(bad.get("prompt"), list) else []
    text = "".join(json.dumps(r) + "\n" for r in rows) + "\n" + json.dumps(bad) + "\n"
    path.write_text(text)  # a blank line: the file line is not the row index
    with pytest.raises(DataError) as err:
        prepare_preference_data(data_cfg(str(path)), PreferenceConfig(), chatml, 256, 0)
    line = len(rows) + 2
    assert re.fullmatch(rf"{re.escape(str(path))}:{line}: .*", str(err.value))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "Hi.", "chosen": 3, "rejected": 4}, "'chosen' must be a string or a list"),
        ({"prompt": "Hi.", "completion": "Yo.", "label": "maybe"}, "'label' must be true or false"),
        ({"prompt": "Hi.", "completion": "Yo."}, "row has no 'label' field"),
    ],
)
def test_wrong_types_and_kto_labels_are_named(
    tmp_path: Path, chatml: Any, row: dict[str, Any], message: str
) -> None:
    path = write(tmp_path / "rows.jsonl", [row])
    pref = PreferenceConfig(loss="kto" if "completion" in row else "dpo")
    with pytest.raises(DataError, match=rf"^{re.escape(path)}:1: .*{re.escape(message)}"):
        prepare_preference_data(data_cfg(path), pref, chatml, 256, 0)


def test_exact_duplicate_pairs_are_dropped(tmp_path: Path, chatml: Any) -> None:
    rows = [ROWS[0], ROWS[1], ROWS[0], ROWS[2], ROWS[0]]
    data = prepare(tmp_path, rows, chatml)
    stats = data.stats.splits["train"]
    assert (stats.rows_loaded, stats.rows_kept, stats.dropped["duplicate"]) == (5, 3, 2)
    assert stats.tokens == sum(
        len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in data.train
    )
    assert len(prepare(tmp_path, rows, chatml, drop_duplicates=False).train) == 5


def test_collator_stacks_chosen_then_rejected_right_padded(chatml: Any, tmp_path: Path) -> None:
    rows = list(prepare(tmp_path, ROWS, chatml).train)
    filler = {k: v if "input_ids" in k else [IGNORE_INDEX] * len(v) for k, v in rows[0].items()}
    batch = PreferenceCollator(pad_token_id=7)([*rows, filler])
    b = len(rows) + 1
    assert int(batch["pair_rows"]) == b and batch["pair_rows"].dtype == torch.long
    seqs = [r[f"{side}_input_ids"] for side in ("chosen", "rejected") for r in [*rows, filler]]
    width = max(map(len, seqs))
    assert batch["input_ids"].shape == batch["labels"].shape == (2 * b, width)
    for i, ids in enumerate(seqs):
        n = len(ids)
        assert batch["input_ids"][i, :n].tolist() == ids
        assert batch["input_ids"][i, n:].eq(7).all() and batch["labels"][i, n:].eq(-100).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
    assert batch["labels"][b - 1].eq(-100).all() and batch["labels"][2 * b - 1].eq(-100).all()
    assert (
        batch["labels"][b].tolist()[: len(rows[0]["rejected_labels"])] == rows[0]["rejected_labels"]
    )


def test_kto_collator_adds_mismatched_rows_for_the_kl_reference(chatml: Any) -> None:
    rows = [
        {"input_ids": [1, 2, 3, 10, 11], "labels": [-100, -100, -100, 10, 11], "desirable": True},
        {"input_ids": [4, 5, 20, 21, 22], "labels": [-100, -100, 20, 21, 22], "desirable": False},
        {"input_ids": [6, 30], "labels": [-100, 30], "desirable": True},
    ]
    batch = PreferenceCollator(pad_token_id=0)(rows)
    assert int(batch["kl_rows"]) == 3 and batch["desirable"].tolist() == [True, False, True]
    assert batch["input_ids"].shape == (6, 5)
    kl = [
        batch["input_ids"][3 + i][batch["attention_mask"][3 + i].bool()].tolist() for i in range(3)
    ]
    # row i's prompt + row i+1's completion, no longer than the longer of the two rows
    assert kl == [[1, 2, 3, 20, 21], [4, 5, 30], [6, 10, 11]]
    assert batch["labels"][3].tolist() == [-100, -100, -100, 20, 21]
    single = PreferenceCollator(pad_token_id=0)(rows[:1])
    assert int(single["kl_rows"]) == 0 and single["input_ids"].shape == (1, 5)


def test_task_dispatch_and_the_fingerprint_follow_section_preference(
    tmp_path: Path, chatml: Any
) -> None:
    path = write(
        tmp_path / "pairs.jsonl",
        [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in ROWS],
    )
    pref = PreferenceConfig(prompt_field="q", chosen_field="good", rejected_field="bad")
    data, names = prepare_for_task(data_cfg(path), chatml, 256, 0, "preference", pref)
    assert names is None and len(data.train) == 3
    cfg = Config(
        task="preference",
        model={"name_or_path": str(tmp_path)},
        data=data_cfg(path).model_dump(),
        preference=pref.model_dump(),
        output_dir=str(tmp_path / "run"),
    )
    assert isinstance(make_collator(cfg, chatml), PreferenceCollator)
    digests = {
        fingerprint(data_cfg(path), chatml, 256, 0, "preference", p)
        for p in (pref, PreferenceConfig(), PreferenceConfig(loss="kto"))
    }
    assert len(digests) == 3
    assert fingerprint(data_cfg(path), chatml, 256, 0, "causal_lm", pref) == fingerprint(
        data_cfg(path), chatml, 256, 0, "causal_lm"
    )


def test_a_template_rendering_the_prompt_differently_per_completion_is_an_error(
    tmp_path: Path, chatml: Any
) -> None:
    """Here the user turn shows the reply's length: chosen and rejected would be scored
    after different prompts, which no preference loss assumes."""
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}"
        "{% if m['role'] == 'user' %} ({{ messages[-1]['content'] | length }}){% endif %}"
        "\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: the chat template renders the prompt"):
        prepare(tmp_path, [ROWS[2]], chatml, chat_template=template)


def test_the_prepared_store_keeps_preference_rows(tmp_path: Path, chatml: Any) -> None:
    """Prepared once, reused by the next run; a changed preference field prepares anew."""
    from bigft.data.prepared import prepared_for_task

    path = write(tmp_path / "pairs.jsonl", [*ROWS, ROWS[0]])
    data = {**data_cfg(path).model_dump(), "cache": True, "prepared_dir": str(tmp_path / "store")}

    def run(**pref: Any) -> Any:
        cfg = Config(
            task="preference",
            model={"name_or_path": str(tmp_path)},
            data=data,
            preference=pref,
            output_dir=str(tmp_path / "run"),
        )
        return prepared_for_task(cfg, chatml)

    first, _, made = run()
    second, _, reused = run()
    assert (made.outcome, reused.outcome) == ("prepared", "reused")
    assert second.train[:] == first.train[:]
    assert second.stats.splits["train"].dropped["duplicate"] == 1
    _, _, again = run(loss="simpo")
    assert again.outcome == "prepared" and again.fingerprint != made.fingerprint
