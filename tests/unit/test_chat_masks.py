"""Chat label masks against real-shaped tokenizers: the training ids are the tokenization of
the rendered conversation, and exactly the assistant turns (content + end-of-turn) are
targets.

The tokenizers are trained here with the `tokenizers` library, shaped like the real ones:
byte-level BPE with ChatML (Qwen2.5: end of turn `<|im_end|>`, eos `<|endoftext|>`),
byte-level BPE with Llama-3 headers (`<|eot_id|>`, eos `<|end_of_text|>`), and a
Metaspace (SentencePiece-style) BPE with the Llama-2 `[INST]` template (`</s>` per turn).
They are trained on rendered conversations, so merges across turn boundaries exist.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from bigft.data.chat import BUILTIN_CHAT_TEMPLATE
from bigft.data.formats import IGNORE_INDEX, FormatSpec, Formatter, prompt_and_reference

# The real templates (Qwen2.5-Instruct, Llama-2-chat, Meta-Llama-3-Instruct).
QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n'
    '    {{- "\\n</tools><|im_end|>\\n" }}\n'
    "{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a "
    "helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) '
    'or (message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' "
    "+ '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# Leading spaces, punctuation and non-ASCII next to the turn boundaries.
CONVERSATIONS: list[list[dict[str, str]]] = [
    [
        {"role": "system", "content": "Tu es concis. Réponds en français."},
        {"role": "user", "content": "Quelle est la capitale du Japon ?"},
        {"role": "assistant", "content": " Tōkyō (東京), bien sûr !"},
        {"role": "user", "content": "Et celle de la Suisse ?"},
        {"role": "assistant", "content": "Berne — pas Zürich."},
        {"role": "user", "content": " Merci…"},
        {"role": "assistant", "content": ":) De rien."},
    ],
    [
        {"role": "user", "content": "What's 6 × 7?"},
        {"role": "assistant", "content": " 42."},
        {"role": "user", "content": "And naïve café prices, in €?"},
        {"role": "assistant", "content": "About 2,50 € — “cheap”!"},
    ],
]

WORDS_TEXT = (
    "the a cat dog sat on mat café naïve über Zürich résumé 東京 Tōkyō hello world , . ! ? : ; "
    "— “ ” … € × ( ) 42 2,50 it's we're bien sûr merci capitale Japon Suisse Berne"
)


def corpus(template: str, bos: str, eos: str) -> list[str]:
    """Sentences plus conversations rendered by `template` and the built-in template, so
    the BPE learns merges around the markers (whitespace after headers, before end of turn)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rng = random.Random(0)
    words = WORDS_TEXT.split(" ")
    texts = [" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(300)]
    for chat_template in (template, BUILTIN_CHAT_TEMPLATE):
        rendered, _ = render_jinja_template(
            conversations=CONVERSATIONS, chat_template=chat_template, bos_token=bos, eos_token=eos
        )
        texts += rendered * 10
    return texts


def byte_level(special: list[str], template: str, bos: str | None, eos: str) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    qwen_split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(qwen_split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(template, bos or "", eos), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=eos,
        chat_template=template,
        clean_up_tokenization_spaces=False,
    )


def qwen_like() -> Any:
    return byte_level(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], QWEN25_TEMPLATE, None, "<|endoftext|>"
    )


def llama3_like() -> Any:
    special = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    return byte_level(special, LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|end_of_text|>")


def llama2_like() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    # Like SentencePiece: a piece starts with "▁" (the space before a word), so a space the
    # template renders before a reply ("[/INST] " + reply) merges into the reply's piece;
    # a newline is a piece of its own (Llama's <0x0A>).
    metaspace = {"replacement": "▁", "prepend_scheme": "first", "split": True}
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.Metaspace(**metaspace)]
    )
    backend.decoder = decoders.Metaspace(**metaspace)
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    backend.train_from_iterator(corpus(LLAMA2_TEMPLATE, "<s>", "</s>"), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=LLAMA2_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def builtin_on(make: Callable[[], Any]) -> Callable[[], Any]:
    def base_model() -> Any:
        tokenizer = make()
        tokenizer.chat_template = None  # a base model: the built-in template renders chats
        return tokenizer

    return base_model


# name -> (tokenizer, the rendered generation header, an assistant turn's expected target)
STYLES: dict[str, tuple[Callable[[], Any], str, Callable[[str], str]]] = {
    "qwen2.5": (qwen_like, "<|im_start|>assistant\n", lambda c: c + "<|im_end|>"),
    "llama3": (llama3_like, "<|end_header_id|>\n\n", lambda c: c.strip() + "<|eot_id|>"),
    # The template renders " " + content.strip() + " </s>". The Metaspace decoder drops
    # the leading space of what it decodes; the header check below pins where runs start.
    "llama2": (llama2_like, "[/INST]", lambda c: c.strip() + " </s>"),
    "builtin-bytelevel": (
        builtin_on(llama3_like),
        "<|assistant|>\n",
        lambda c: c + "<|end_of_text|>",
    ),
    "builtin-metaspace": (
        builtin_on(llama2_like),
        "<|assistant|>\n",
        lambda c: c.lstrip(" ") + "</s>",
    ),
}


@pytest.fixture(scope="module", params=list(STYLES))
def style(request: pytest.FixtureRequest) -> tuple[str, Any]:
    return request.param, STYLES[request.param][0]()


def target_runs(ids: list[int], labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) token ranges of the maximal runs of targets."""
    runs: list[tuple[int, int]] = []
    for i, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        assert label == ids[i]  # a target's label is its own id (HF shifts labels itself)
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["system+3turns", "2turns"])
def test_chat_ids_are_the_rendered_conversation_and_only_assistant_turns_are_targets(
    style: tuple[str, Any], conversation: list[dict[str, str]]
) -> None:
    name, tokenizer = style
    _, header, expected_target = STYLES[name]
    template = tokenizer.chat_template or BUILTIN_CHAT_TEMPLATE
    ids, labels = Formatter(FormatSpec("chat"), tokenizer)({"messages": conversation})

    rendered = tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False)
    whole = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token
    # A bos is added only when the template does not render one itself.
    assert ids == ([tokenizer.bos_token_id] if bos and not rendered.startswith(bos) else []) + whole
    if tokenizer.chat_template is not None:
        assert ids == chat_ids(tokenizer, conversation)
    # No eos the template does not render (Qwen: <|endoftext|> never appears).
    assert ids.count(tokenizer.eos_token_id) == rendered.count(tokenizer.eos_token)

    runs = target_runs(ids, labels)
    decoded = [tokenizer.decode(ids[a:b], skip_special_tokens=False) for a, b in runs]
    replies = [m["content"] for m in conversation if m["role"] == "assistant"]
    assert decoded == [expected_target(reply) for reply in replies]
    for start, _ in runs:  # every target run starts right after the assistant header
        assert tokenizer.decode(ids[:start], skip_special_tokens=False).endswith(header)
    assert labels[0] == IGNORE_INDEX

    prompt, reference = prompt_and_reference(ids, labels, tokenizer)
    assert prompt == ids[: runs[0][0]]
    assert reference == replies[0].strip()


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)
TEMPLATE_VARIANTS = {
    # An eos after the last turn only (as Phi-3's template does): earlier turns are not a
    # prefix of the whole text, so their contents are located instead.
    "eos-after-last-turn": CHATML
    + "{% if add_generation_prompt %}<|im_start|>assistant\n{% else %}{{ eos_token }}{% endif %}",
    # No generation prompt: the header is part of the turn's text and still not a target.
    "no-generation-prompt": CHATML,
    "qwen2.5-with-tool-turn": QWEN25_TEMPLATE,
}


@pytest.fixture(scope="module")
def qwen() -> Any:
    return qwen_like()


@pytest.mark.parametrize("variant", list(TEMPLATE_VARIANTS))
def test_template_variants_target_content_and_end_of_turn_only(qwen: Any, variant: str) -> None:
    template = TEMPLATE_VARIANTS[variant]
    conversation = [
        *CONVERSATIONS[1][:2],
        {"role": "tool", "content": '{"price": "2,50 €"}'},
        *CONVERSATIONS[1][2:],
    ]
    spec = FormatSpec("chat", chat_template=template)
    ids, labels = Formatter(spec, qwen)({"messages": conversation})
    rendered = qwen.apply_chat_template(conversation, chat_template=template, tokenize=False)
    assert ids == qwen(rendered, add_special_tokens=False)["input_ids"]
    assert ids.count(qwen.eos_token_id) == rendered.count(qwen.eos_token)
    runs = [qwen.decode(ids[a:b]) for a, b in target_runs(ids, labels)]
    replies = [m["content"] for m in conversation if m["role"] == "assistant"]
    assert runs == [reply + "<|im_end|>" for reply in replies]


def test_a_reply_tokenized_alone_differs_from_the_reply_in_the_conversation() -> None:
    """Why the whole text is tokenized once: SentencePiece-style tokenizers start a text
    with a word-start "▁", so a reply tokenized on its own ("Berne" -> "▁Berne") differs
    from the same reply after the template's "<|assistant|>\n"."""
    tokenizer = builtin_on(llama2_like)()
    ids, _ = Formatter(FormatSpec("chat"), tokenizer)({"messages": CONVERSATIONS[0]})
    rendered = tokenizer.apply_chat_template(
        CONVERSATIONS[0], chat_template=BUILTIN_CHAT_TEMPLATE, tokenize=False
    )
    cut = rendered.index("Berne")
    alone = tokenizer(rendered[cut:], add_special_tokens=False)["input_ids"]
    in_context = tokenizer(rendered, add_special_tokens=False)["input_ids"][-len(alone) :]
    assert alone != in_context
    assert ids[1:] == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_blank_reply_has_no_targets_and_completion_only_off_trains_all_but_first(
    style: tuple[str, Any],
) -> None:
    _, tokenizer = style
    conversation = CONVERSATIONS[1]
    blank = [dict(m, content="  ") if m["role"] == "assistant" else m for m in conversation]
    _, labels = Formatter(FormatSpec("chat"), tokenizer)({"messages": blank})
    assert set(labels) == {IGNORE_INDEX}

    ids, labels = Formatter(FormatSpec("chat", completion_only=False), tokenizer)(
        {"messages": conversation}
    )
    assert labels == [IGNORE_INDEX, *ids[1:]]


class SlowTokenizer:
    """A tokenizer without offset mappings (like a Python "slow" tokenizer)."""

    is_fast = False

    def __init__(self, fast: Any) -> None:
        self._fast = fast

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fast, name)

    def __call__(self, text: str, **kwargs: Any) -> Any:
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available")
        return self._fast(text, **kwargs)


def test_tokenizer_without_offsets_gives_the_same_rows(style: tuple[str, Any]) -> None:
    _, tokenizer = style
    fast = Formatter(FormatSpec("chat"), tokenizer)
    slow = Formatter(FormatSpec("chat"), SlowTokenizer(tokenizer))
    for conversation in CONVERSATIONS:
        assert slow({"messages": conversation}) == fast({"messages": conversation})
