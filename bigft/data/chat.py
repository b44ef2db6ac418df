"""Chat rows: OpenAI `messages` or ShareGPT `conversations` read into one message list, and
the assistant spans of a rendered conversation located by character (each assistant
message's content plus the template's end-of-turn marker after it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from bigft.errors import RowError

# Used when neither data.chat_template nor the tokenizer has one (base models). The eos
# token closes each assistant turn (its end-of-turn marker) so generation stops there.
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


def special_token_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """A regex matching any of the tokenizer's special tokens (the candidates for a
    template's end-of-turn marker), longest first; None when it has none."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens = {
        str(getattr(token, "content", token))
        for token in added.values()
        if getattr(token, "special", False)
    }
    tokens.update(getattr(tokenizer, "all_special_tokens", None) or [])
    tokens.add(tokenizer.eos_token or "")
    tokens.discard("")
    if not tokens:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=lambda t: (-len(t), t))))


def assistant_spans(
    messages: list[dict[str, str]],
    render: Callable[[list[dict[str, str]], bool], str],
    full: str,
    end_of_turn: re.Pattern[str] | None,
) -> list[tuple[int, int]]:
    """Character spans of `full` the model must produce: each assistant message's content
    as rendered, plus the end-of-turn marker the template closes it with.

    A turn's text is found by incremental rendering: what messages[:i+1] adds beyond
    messages[:i] with a generation prompt. In it the content is located (verbatim, else
    stripped, as Llama-2/3 templates trim it). The span starts at the content, or at the
    turn's start when only whitespace precedes it (Llama-2's " " + content: a tokenizer
    merges that space into the reply's first piece). It ends after the first special token
    (a match of `end_of_turn`: `<|im_end|>`, `<|eot_id|>`, `</s>`) that follows the
    content, so template text after the marker (a newline) is not trained on; a turn
    closed by no special token keeps its text up to its last non-space character (a
    textual marker). A template that renders the content changed (reasoning moved into a
    block) gives the turn's whole text up to its end-of-turn.

    Templates that rewrite earlier turns (a generation prompt that changes earlier text,
    an eos after the last turn only) break the prefix property; then the content is
    located in `full` after the previous span, and a special token right after it
    (whitespace between allowed) is its end-of-turn.
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
        stable = bool(upto) and upto.startswith(before) and full.startswith(upto)
        if stable and len(before) >= cursor:
            turn, turn_end = len(before), len(upto)
            found = _find_content(full, message["content"], turn, turn_end)
            start, content_end = found or (turn, turn)
            if not full[turn:start].strip():
                start = turn
            marker = end_of_turn.search(full, content_end, turn_end) if end_of_turn else None
            tail = full[content_end:turn_end].rstrip()
            end = marker.end() if marker else content_end + len(tail)
        else:
            found = _find_content(full, message["content"], cursor, len(full))
            if found is None:
                raise RowError(
                    f"chat template does not render assistant turn {i} verbatim, so its "
                    "tokens cannot be located for masking; use another data.chat_template"
                )
            start, end = found
            after = end
            while after < len(full) and full[after].isspace():
                after += 1
            marker = end_of_turn.match(full, after) if end_of_turn else None
            if marker:
                end = marker.end()
        spans.append((start, end))
        cursor = end
    return spans


def _find_content(full: str, content: str, lo: int, hi: int) -> tuple[int, int] | None:
    """[start, end) of `content` (or, failing that, of it stripped) in full[lo:hi]."""
    for text in (content, content.strip()):
        start = full.find(text, lo, hi)
        if start >= 0:
            return start, start + len(text)
    return None
