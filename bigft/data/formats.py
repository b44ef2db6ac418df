"""Turn one raw row into `input_ids` and `labels` (label -100 = not trained on).

Three row shapes: `text` (continued pre-training), `alpaca` (instruction / input / output)
and `chat` (OpenAI `messages` or ShareGPT `conversations`, rendered by a chat template).

Rules shared by all formats:
- `bos_token_id` is prepended when the tokenizer has one (chat: unless the rendered text
  already starts with it);
- position 0 is never a target: in a packed row it would be predicted from the previous
  sequence's last token;
- a blank response yields a row with no targets, which cleaning drops as `empty`.

text / alpaca: segments are tokenized separately with `add_special_tokens=False`, so the
prompt's ids are exactly what `tokenizer(prompt)` gives at generation time; `eos_token_id`
ends each response and is a target, so the model learns to stop.

chat: the conversation is rendered once by the template and tokenized once, so the ids are
exactly `tokenizer(rendered, add_special_tokens=False)` (what `apply_chat_template`
gives), merges across turn boundaries included. No eos is added: a turn ends with whatever
the template closes it with (`<|im_end|>`, `<|eot_id|>`, `</s>`). Targets are the
assistant spans, located by character: each assistant message's content plus the
template's end-of-turn marker after it (see `assistant_spans`); role headers, other roles'
text and template text after the marker are not. A token carrying any character of a span
is a target (a piece merged across the boundary is one the model must produce).
"""

from __future__ import annotations

import string
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from bigft.data.chat import (
    BUILTIN_CHAT_TEMPLATE,
    assistant_spans,
    chat_messages,
    special_token_pattern,
)
from bigft.errors import ConfigError, RowError

IGNORE_INDEX = -100


ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


SHORT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


SHORT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass(frozen=True)
class FormatSpec:
    """How rows of one dataset become token ids (the data-config values formatting needs)."""

    format: Literal["text", "alpaca", "chat"]
    text_field: str = "text"
    prompt_template: str = "alpaca"
    chat_template: str | None = None
    completion_only: bool = True

    def __post_init__(self) -> None:
        custom = self.prompt_template not in ("alpaca", "short")
        if self.format == "alpaca" and custom and "{instruction}" not in self.prompt_template:
            raise ConfigError(
                "data.prompt_template: must be 'alpaca', 'short', or a string containing "
                "{instruction} (and optionally {input})"
            )


def render_prompt(template: str, instruction: str, input_text: str) -> str:
    """The alpaca prompt text (everything before the response)."""
    if template in ("alpaca", "short"):
        named = {
            ("alpaca", True): ALPACA_WITH_INPUT,
            ("alpaca", False): ALPACA_NO_INPUT,
            ("short", True): SHORT_WITH_INPUT,
            ("short", False): SHORT_NO_INPUT,
        }
        template = named[(template, bool(input_text))]
    elif input_text and "{input}" not in template:
        # A custom template without an input slot must not silently lose the input.
        instruction = f"{instruction}\n\n{input_text}"
    # The template is read with format-string rules ({{ is a literal brace), but the
    # user's text is spliced in, never formatted: it is full of braces (code, JSON).
    values = {"instruction": instruction, "input": input_text}
    parts = string.Formatter().parse(template)
    return "".join(text + (values[name] if name is not None else "") for text, name, _, _ in parts)


class Formatter:
    """Callable row -> (input_ids, labels). Picklable, so `datasets.map(num_proc>1)` can
    ship it to worker processes, and hashable by `datasets` for its cache fingerprint."""

    def __init__(self, spec: FormatSpec, tokenizer: Any) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one renders chats
            own = own.get("default")
        self.chat_template = spec.chat_template or own or BUILTIN_CHAT_TEMPLATE
        self.end_of_turn = special_token_pattern(tokenizer)

    def __call__(self, row: Mapping[str, Any]) -> tuple[list[int], list[int]]:
        if self.spec.format == "text":
            return self._text(row)
        if self.spec.format == "alpaca":
            return self._alpaca(row)
        return self._chat(row)

    # -- pieces --------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _eos(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [] if eos is None else [eos]

    def _assemble(
        self, pieces: Sequence[tuple[list[int], bool]], blank: bool, add_bos: bool = True
    ) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        if add_bos and self.tokenizer.bos_token_id is not None:
            ids.append(self.tokenizer.bos_token_id)
            labels.append(IGNORE_INDEX)
        for tokens, target in pieces:
            ids.extend(tokens)
            labels.extend(tokens if target and not blank else [IGNORE_INDEX] * len(tokens))
        if labels:
            labels[0] = IGNORE_INDEX
        return ids, labels

    # -- formats -------------------------------------------------------------------------

    def _text(self, row: Mapping[str, Any]) -> tuple[list[int], list[int]]:
        field = self.spec.text_field
        text = _string_field(row, field, "text", required=True, hint=" (set data.text_field)")
        return self._assemble([(self._encode(text), True), (self._eos(), True)], not text.strip())

    def _alpaca(self, row: Mapping[str, Any]) -> tuple[list[int], list[int]]:
        instruction = _string_field(row, "instruction", "alpaca", required=True)
        input_text = _string_field(row, "input", "alpaca", required=False)
        output = _string_field(row, "output", "alpaca", required=True)
        prompt = render_prompt(self.spec.prompt_template, instruction, input_text)
        pieces = [
            (self._encode(prompt), not self.spec.completion_only),
            (self._encode(output), True),
            (self._eos(), True),
        ]
        return self._assemble(pieces, blank=not output.strip())

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return str(
            self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        )

    def _chat(self, row: Mapping[str, Any]) -> tuple[list[int], list[int]]:
        messages = chat_messages(row)
        if not any(m["role"] == "assistant" for m in messages):
            raise RowError("chat row has no assistant turn: nothing to train on")
        try:
            full = self._render(messages, False)
            spans = assistant_spans(messages, self._render, full, self.end_of_turn)
        except RowError:
            raise
        except Exception as exc:  # jinja raises on roles or orders a template rejects
            raise RowError(f"chat template failed on this row ({exc})") from None
        ids, in_span = self._encode_marked(full, spans)
        train_all = not self.spec.completion_only
        blank = all(not m["content"].strip() for m in messages if m["role"] == "assistant")
        labels = [
            token if (mark or train_all) and not blank else IGNORE_INDEX
            for token, mark in zip(ids, in_span, strict=True)
        ]
        bos, bos_id = self.tokenizer.bos_token, self.tokenizer.bos_token_id
        if bos_id is not None and not (bos and full.startswith(bos)):
            ids, labels = [bos_id, *ids], [IGNORE_INDEX, *labels]
        if labels:
            labels[0] = IGNORE_INDEX
        return ids, labels

    def _encode_marked(
        self, text: str, spans: Sequence[tuple[int, int]]
    ) -> tuple[list[int], list[bool]]:
        """Token ids of `text` (no special tokens added) and, per token, whether it carries
        a character of one of `spans` (sorted, disjoint [start, end) character ranges)."""
        if not getattr(self.tokenizer, "is_fast", False):
            return self._encode_marked_by_prefixes(text, spans)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = [start for start, _ in spans]
        marks: list[bool] = []
        for first, end in encoded["offset_mapping"]:
            # An empty piece (a "▁" a SentencePiece-style tokenizer inserts) counts at its
            # position; any other piece by its last character.
            last = end - 1 if end > first else first
            j = bisect_right(starts, last) - 1
            marks.append(j >= 0 and spans[j][1] > first)
        return list(encoded["input_ids"]), marks

    def _encode_marked_by_prefixes(
        self, text: str, spans: Sequence[tuple[int, int]]
    ) -> tuple[list[int], list[bool]]:
        """`_encode_marked` for tokenizers without offsets (Python "slow" ones).

        The tokens before a boundary are those `text[:boundary]` shares with the whole
        text. Tokenizers work left to right, so the two differ at most in the piece the
        whole text merges across the boundary (Llama-2's "▁" + reply); that piece carries
        characters of the span, so it is a target, as with offsets. A boundary where more
        than one piece differs cannot be placed without offsets: the row is refused rather
        than masked by guess. Costs one extra tokenization per boundary.
        """
        ids = self._encode(text)
        marks = [False] * len(ids)
        for start, end in spans:
            first, _ = self._boundary(text[:start], ids)
            stop, straddles = self._boundary(text[:end], ids)
            for i in range(first, min(stop + straddles, len(ids))):
                marks[i] = True
        return ids, marks

    def _boundary(self, prefix: str, ids: Sequence[int]) -> tuple[int, int]:
        """(index in `ids` where `prefix` ends, 1 if the piece there straddles it else 0)."""
        own = self._encode(prefix)
        shared = _common_prefix(own, ids)
        if len(own) - shared > 1:
            raise RowError(
                "this tokenizer has no offset mapping and tokenizes this conversation "
                "differently across an assistant-turn boundary, so the turn cannot be "
                "masked exactly; use a fast tokenizer (one with tokenizer.json)"
            )
        return shared, len(own) - shared


def _string_field(
    row: Mapping[str, Any], name: str, kind: str, required: bool, hint: str = ""
) -> str:
    value = row.get(name)
    if value is None:
        if required:
            raise RowError(f"{kind} row has no '{name}' field{hint}")
        return ""
    if not isinstance(value, str):
        raise RowError(f"{kind} row: '{name}' must be a string, got {type(value).__name__}")
    return value


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def prompt_and_reference(
    input_ids: Sequence[int], labels: Sequence[int], tokenizer: Any
) -> tuple[list[int], str]:
    """Split a formatted row for exact-match evaluation by generation.

    Returns the ids before the first target (the prompt to generate from) and the text of
    the first target span up to its eos (the reference answer, special tokens removed,
    surrounding whitespace stripped). Meaningful for completion-only rows.
    """
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if first is None:
        raise ValueError("row has no target tokens")
    eos = tokenizer.eos_token_id
    end = first
    while end < len(labels) and labels[end] != IGNORE_INDEX and input_ids[end] != eos:
        end += 1
    reference = tokenizer.decode(list(input_ids[first:end]), skip_special_tokens=True)
    return list(input_ids[:first]), reference.strip()
