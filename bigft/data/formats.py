"""Turn one raw row into `input_ids` and `labels` (label -100 = not trained on).

Three row shapes: `text` (continued pre-training), `alpaca` (instruction / input / output)
and `chat` (OpenAI `messages` or ShareGPT `conversations`, rendered by a chat template).

Rules shared by all formats:
- segments are tokenized separately with `add_special_tokens=False`, so the prompt's ids
  are exactly what `tokenizer(prompt)` gives at generation time;
- `bos_token_id` is prepended when the tokenizer has one (chat: unless the rendered text
  already starts with it), `eos_token_id` ends each response and is a target, so the model
  learns to stop;
- position 0 is never a target: in a packed row it would be predicted from the previous
  sequence's last token;
- a blank response yields a row with no targets, which cleaning drops as `empty`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from bigft.errors import ConfigError

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

# Used when neither data.chat_template nor the tokenizer has one (base models). The eos
# token closes each assistant turn so generation stops there.
BUILTIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# OpenAI roles plus the ShareGPT / LLaMA-Factory vocabulary, mapped onto OpenAI roles.
ROLE_ALIASES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "function_call": "assistant",  # the model emitting a tool call is a model turn
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
    "function_response": "tool",
    "ipython": "tool",
}


ROLES = ("system", "user", "assistant", "tool")


class RowError(ValueError):
    """A problem with one row; the pipeline prefixes it with `file:line`."""


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
    # str.replace, not str.format: user text is full of braces (code, JSON).
    return template.replace("{instruction}", instruction).replace("{input}", input_text)


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
            spans = assistant_spans(messages, self._render, full, self.tokenizer.eos_token)
        except RowError:
            raise
        except Exception as exc:  # jinja raises on roles or orders a template rejects
            raise RowError(f"chat template failed on this row ({exc})") from None
        train_prompt = not self.spec.completion_only
        eos_id = self.tokenizer.eos_token_id
        pieces: list[tuple[list[int], bool]] = []
        cursor = 0
        for start, end in spans:
            pieces.append((self._encode(full[cursor:start]), train_prompt))
            span = self._encode(full[start:end])
            if eos_id is not None and eos_id in span:
                # Template text after the turn's eos (a newline, say) teaches nothing.
                last = len(span) - 1 - span[::-1].index(eos_id)
                pieces += [(span[: last + 1], True), (span[last + 1 :], train_prompt)]
            else:
                pieces += [(span, True), (self._eos(), True)]
            cursor = end
        pieces.append((self._encode(full[cursor:]), train_prompt))
        bos = self.tokenizer.bos_token
        blank = all(not m["content"].strip() for m in messages if m["role"] == "assistant")
        return self._assemble(pieces, blank, add_bos=not (bos and full.startswith(bos)))


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


def chat_messages(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """Normalize OpenAI `messages` or ShareGPT `conversations` to [{role, content}]."""
    key = next((k for k in ("messages", "conversations") if row.get(k) is not None), None)
    if key is None:
        raise RowError("chat row has no 'messages' (OpenAI) or 'conversations' (ShareGPT) field")
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        raise RowError(f"chat row: '{key}' must be a non-empty list of turns")
    messages: list[dict[str, str]] = []
    system = row.get("system")  # LLaMA-Factory's ShareGPT keeps the system prompt here
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for j, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise RowError(f"{key}[{j}] must be an object with role/content or from/value")
        role = turn.get("role") if turn.get("role") is not None else turn.get("from")
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        if role is None:
            raise RowError(f"{key}[{j}] has no 'role' (OpenAI) or 'from' (ShareGPT)")
        mapped = ROLE_ALIASES.get(str(role).strip().lower())
        if mapped is None:
            raise RowError(
                f"{key}[{j}] has unknown role '{role}'; valid roles: system, user, assistant, "
                f"tool (or the aliases {', '.join(sorted(set(ROLE_ALIASES) - set(ROLES)))})"
            )
        messages.append({"role": mapped, "content": _content_text(content, f"{key}[{j}]")})
    return messages


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    # OpenAI content parts: [{"type": "text", "text": ...}, ...]
    if isinstance(content, list) and all(
        isinstance(p, Mapping) and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    if content is None:
        raise RowError(f"{where} has no 'content' (OpenAI) or 'value' (ShareGPT)")
    raise RowError(f"{where}: content must be a string, got {type(content).__name__}")


def assistant_spans(
    messages: list[dict[str, str]],
    render: Callable[[list[dict[str, str]], bool], str],
    full: str,
    eos_token: str | None,
) -> list[tuple[int, int]]:
    """Character spans of `full` produced by each assistant turn.

    Incremental rendering: the text added by messages[:i+1] beyond messages[:i] with a
    generation prompt is what the model must produce for turn i (content plus the
    template's end-of-turn markers). Templates that rewrite earlier turns (some strip
    reasoning from history) break the prefix property; then we locate the content itself.
    """
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            before = render(messages[:i], True)
            upto = render(messages[: i + 1], False)
        except Exception:  # e.g. a template that cannot render an empty conversation
            before = upto = ""
        if upto and upto.startswith(before) and full.startswith(upto) and len(before) >= cursor:
            spans.append((len(before), len(upto)))
            cursor = len(upto)
            continue
        start = full.find(message["content"], cursor)
        if start < 0:
            raise RowError(
                f"chat template does not render assistant turn {i} verbatim, so its tokens "
                "cannot be located for masking; use another data.chat_template"
            )
        end = start + len(message["content"])
        if eos_token and full.startswith(eos_token, end):
            end += len(eos_token)
        spans.append((start, end))
        cursor = end
    return spans


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
