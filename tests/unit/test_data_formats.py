"""Row formatting: exact label masks, templates, chat forms, prompt/reference split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bigft.data import prompt_and_reference
from bigft.data.formats import (
    ALPACA_NO_INPUT,
    ALPACA_WITH_INPUT,
    IGNORE_INDEX,
    FormatSpec,
    Formatter,
)
from bigft.errors import ConfigError, RowError

DATA = Path(__file__).parents[1] / "assets" / "data"


def read_jsonl(name: str) -> list[dict[str, Any]]:
    lines = (DATA / name).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def target_runs(ids: list[int], labels: list[int], tokenizer: Any) -> list[str]:
    """Decoded text of each maximal run of target tokens (labels == ids there)."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(ids, labels, strict=True):
        is_target = label != IGNORE_INDEX
        if is_target:
            assert label == token  # HF shifts labels itself; a target label is its own id
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = is_target
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


ALPACA_ROW = {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"}


def test_alpaca_completion_only_masks_the_prompt_exactly(tokenizer: Any) -> None:
    ids, labels = Formatter(FormatSpec("alpaca"), tokenizer)(ALPACA_ROW)
    prompt = ALPACA_WITH_INPUT.replace("{instruction}", "Add the numbers.").replace(
        "{input}", "2 + 3"
    )
    assert len(ids) == len(labels)
    assert decode(tokenizer, ids) == "<s>" + prompt + "5</s>"
    assert target_runs(ids, labels, tokenizer) == ["5</s>"]
    assert labels[0] == IGNORE_INDEX and ids[0] == tokenizer.bos_token_id


def test_alpaca_without_input_uses_the_no_input_preamble(tokenizer: Any) -> None:
    row = {"instruction": "Name a colour.", "input": "", "output": "Red"}
    ids, labels = Formatter(FormatSpec("alpaca"), tokenizer)(row)
    expected = ALPACA_NO_INPUT.replace("{instruction}", "Name a colour.")
    assert decode(tokenizer, ids) == f"<s>{expected}Red</s>"
    assert target_runs(ids, labels, tokenizer) == ["Red</s>"]


@pytest.mark.parametrize(
    ("template", "prompt"),
    [
        ("short", "### Instruction:\nAdd the numbers.\n\n### Input:\n2 + 3\n\n### Response:\n"),
        ("Q: {instruction} [{input}]\nA: ", "Q: Add the numbers. [2 + 3]\nA: "),
        ("Q: {instruction}\nA: ", "Q: Add the numbers.\n\n2 + 3\nA: "),  # input kept
    ],
)
def test_alpaca_templates(tokenizer: Any, template: str, prompt: str) -> None:
    ids, labels = Formatter(FormatSpec("alpaca", prompt_template=template), tokenizer)(ALPACA_ROW)
    assert decode(tokenizer, ids) == f"<s>{prompt}5</s>"
    assert target_runs(ids, labels, tokenizer) == ["5</s>"]


def test_custom_template_without_instruction_slot_is_rejected() -> None:
    with pytest.raises(ConfigError, match="prompt_template"):
        FormatSpec("alpaca", prompt_template="Answer this:")


def test_alpaca_without_completion_only_trains_everything_but_position_zero(
    tokenizer: Any,
) -> None:
    ids, labels = Formatter(FormatSpec("alpaca", completion_only=False), tokenizer)(ALPACA_ROW)
    assert labels[0] == IGNORE_INDEX
    assert labels[1:] == ids[1:]


def test_blank_output_gives_no_targets(tokenizer: Any) -> None:
    row = {"instruction": "x", "output": "  "}
    _, labels = Formatter(FormatSpec("alpaca"), tokenizer)(row)
    assert set(labels) == {IGNORE_INDEX}


def test_text_rows_train_on_every_token_but_the_first(tokenizer: Any) -> None:
    ids, labels = Formatter(FormatSpec("text"), tokenizer)({"text": "abc"})
    assert decode(tokenizer, ids) == "<s>abc</s>"
    assert labels == [IGNORE_INDEX, *ids[1:]]
    with pytest.raises(RowError, match="no 'body' field"):
        Formatter(FormatSpec("text", text_field="body"), tokenizer)({"text": "abc"})


def test_multi_turn_chat_trains_only_assistant_turns_with_builtin_template(
    tokenizer: Any,
) -> None:
    assert tokenizer.chat_template is None  # so the built-in template must be used
    row = read_jsonl("chat_messages.jsonl")[0]
    ids, labels = Formatter(FormatSpec("chat"), tokenizer)(row)
    assert decode(tokenizer, ids) == (
        "<s><|system|>\nBe brief.\n<|user|>\n2+2?\n<|assistant|>\n4</s>\n"
        "<|user|>\nAnd 3+3?\n<|assistant|>\n6</s>\n"
    )
    assert target_runs(ids, labels, tokenizer) == ["4</s>", "6</s>"]


def test_sharegpt_and_openai_forms_give_identical_ids(tokenizer: Any) -> None:
    formatter = Formatter(FormatSpec("chat"), tokenizer)
    openai = [formatter(row) for row in read_jsonl("chat_messages.jsonl")]
    sharegpt = [formatter(row) for row in read_jsonl("sharegpt.jsonl")]
    assert openai == sharegpt


BRACKET_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def test_tokenizer_template_is_used_and_config_template_overrides_it(tokenizer: Any) -> None:
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    own = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    own.chat_template = BRACKET_TEMPLATE
    ids, labels = Formatter(FormatSpec("chat"), own)(row)
    assert decode(own, ids) == "<s>[user] hi\n[assistant] yo</s>\n"
    assert target_runs(ids, labels, own) == ["yo</s>"]

    override = "{% for m in messages %}{{ m['content'] }};{% endfor %}"
    ids, labels = Formatter(FormatSpec("chat", chat_template=override), own)(row)
    # The turn's text is "yo;": no special token closes it, so its textual marker ";" is
    # the end of turn. Nothing the template does not render (an eos) is added.
    assert decode(own, ids) == "<s>hi;yo;"
    assert target_runs(ids, labels, own) == ["yo;"]


def test_template_that_rewrites_history_falls_back_to_locating_content(tokenizer: Any) -> None:
    # The generation prompt changes the *start* of the text, so incremental rendering
    # is not prefix-stable; the assistant spans must still be found.
    template = (
        "{% if add_generation_prompt %}GEN {% endif %}"
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    )
    row = read_jsonl("chat_messages.jsonl")[0]
    ids, labels = Formatter(FormatSpec("chat", chat_template=template), tokenizer)(row)
    assert target_runs(ids, labels, tokenizer) == ["4</s>", "6</s>"]


def test_chat_row_errors(tokenizer: Any) -> None:
    formatter = Formatter(FormatSpec("chat"), tokenizer)
    with pytest.raises(RowError, match=r"messages\[1\] has unknown role 'bot'; valid roles"):
        formatter({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]})
    with pytest.raises(RowError, match="no assistant turn"):
        formatter({"messages": [{"role": "user", "content": "a"}]})
    with pytest.raises(RowError, match="no 'messages'"):
        formatter({"text": "a"})


def test_prompt_and_reference_for_alpaca_and_chat(tokenizer: Any) -> None:
    ids, labels = Formatter(FormatSpec("alpaca", prompt_template="short"), tokenizer)(ALPACA_ROW)
    prompt, reference = prompt_and_reference(ids, labels, tokenizer)
    assert reference == "5"
    assert decode(tokenizer, prompt) == (
        "<s>### Instruction:\nAdd the numbers.\n\n### Input:\n2 + 3\n\n### Response:\n"
    )
    row = read_jsonl("chat_messages.jsonl")[0]
    ids, labels = Formatter(FormatSpec("chat"), tokenizer)(row)
    prompt, reference = prompt_and_reference(ids, labels, tokenizer)
    assert reference == "4"
    assert decode(tokenizer, prompt).endswith("<|user|>\n2+2?\n<|assistant|>\n")


def test_position_zero_is_never_a_target_even_without_bos(tokenizer: Any) -> None:
    no_bos = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    no_bos.bos_token = None
    assert no_bos.bos_token_id is None
    ids, labels = Formatter(FormatSpec("text"), no_bos)({"text": "abc"})
    assert decode(no_bos, ids) == "abc</s>"
    assert labels == [IGNORE_INDEX, *ids[1:]]  # "a" is not predicted from anything


def test_chat_without_completion_only_trains_all_but_position_zero(tokenizer: Any) -> None:
    row = read_jsonl("chat_messages.jsonl")[1]
    ids, labels = Formatter(FormatSpec("chat", completion_only=False), tokenizer)(row)
    assert labels == [IGNORE_INDEX, *ids[1:]]
