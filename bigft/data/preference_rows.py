"""Preference rows (task preference): chosen / rejected pairs (dpo, ipo, simpo, orpo) and
labelled completions (kto), rendered exactly as SFT renders them.

Row layouts (field names from section preference; kto's label from data.label_field):
- text: `prompt`, `chosen`, `rejected` strings. data.format alpaca renders the prompt
  through data.prompt_template (the prompt is the instruction), text uses it as is, chat
  makes it a user turn;
- chat: `prompt` a message list (the conversation so far), each completion a string or a
  one-message list (the assistant's turn); or, as TRL / UltraFeedback store them, each
  completion the FULL conversation (the prompt's messages plus one assistant turn), with
  or without a `prompt` column (a string prompt there repeats the last user turn and is
  not read). Completions must share everything before their last assistant turn.
- kto: `prompt`, `completion` (the same layouts) and a label: a bool, 1 / 0 or
  "true" / "false" (a CSV's "1" / "0" too).

Each sequence is SFT's row (`bigft.data.formats.Formatter`: bos / eos rules, chat template,
assistant spans) for the prompt plus that completion, with only the completion's tokens as
targets (earlier assistant turns of the prompt are context; data.completion_only does not
apply). A pair's two sequences start with identical prompt ids: by construction for text
rows; for chat rows checked, and a template that renders them differently is an error.

Truncation (data.overlong truncate): a sequence over train.seq_len keeps its completion's
start. The prompt loses tokens from the left (after a bos, which stays) until the longest
completion fits, but keeps at least half of seq_len when it has that many; a completion
still too long loses its end (its eos with it). Both sequences of a pair keep the same
prompt tokens. data.overlong drop drops the whole pair.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from datasets import Features, List, Value

from bigft.config import DataConfig, PreferenceConfig
from bigft.data.chat import chat_messages
from bigft.data.formats import IGNORE_INDEX, FormatSpec, Formatter
from bigft.errors import RowError

Messages = list[dict[str, str]]
Encoded = tuple[list[int], list[int], int]  # input ids, labels, prompt length
PAIRED = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
KTO = ("input_ids", "labels", "desirable")
# Per row, dropped once the splits are cleaned: the row's problem ("" when good), its
# longest sequence and all its tokens (after truncation), its target tokens, whether it
# was truncated or is over-long (data.overlong drop), and a digest of its ids and labels.
BOOKKEEPING = ("error", "length", "tokens", "targets", "truncated", "too_long", "digest")
_IDS = List(Value("int32"))
_COMMON = {
    "error": Value("string"),
    "length": Value("int32"),
    "tokens": Value("int32"),
    "targets": Value("int32"),
    "truncated": Value("bool"),
    "too_long": Value("bool"),
    "digest": Value("binary"),
}
PAIRED_FEATURES = Features({**dict.fromkeys(PAIRED, _IDS), **_COMMON})
KTO_FEATURES = Features({"input_ids": _IDS, "labels": _IDS, "desirable": Value("bool"), **_COMMON})


class PreferenceEncoder:
    """`datasets.map` function: raw rows -> token columns, with an `error` per row (empty
    when the row is good) so the pipeline can name the first bad one by file and line.
    Picklable (data.num_proc > 1 ships it to worker processes)."""

    def __init__(
        self, data: DataConfig, pref: PreferenceConfig, tokenizer: Any, seq_len: int
    ) -> None:
        text_prompt = data.prompt_template if data.format == "alpaca" else "{instruction}"
        # Text rows are SFT alpaca rows whose instruction is the prompt (data.format text:
        # a template of the prompt alone); chat rows are SFT chat rows.
        self.text = Formatter(FormatSpec("alpaca", prompt_template=text_prompt), tokenizer)
        self.chat = Formatter(FormatSpec("chat", chat_template=data.chat_template), tokenizer)
        self.chat_text_rows = data.format == "chat"
        self.bos = tokenizer.bos_token_id
        self.seq_len, self.truncate = seq_len, data.overlong == "truncate"
        self.kto = pref.loss == "kto"
        self.prompt_field = pref.prompt_field
        self.fields = (
            [pref.completion_field] if self.kto else [pref.chosen_field, pref.rejected_field]
        )
        self.label_field = data.label_field
        self.features = KTO_FEATURES if self.kto else PAIRED_FEATURES

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        names = [*(KTO if self.kto else PAIRED), *BOOKKEEPING]
        out: dict[str, list[Any]] = {name: [] for name in names}
        size = len(next(iter(batch.values()))) if batch else 0
        for i in range(size):
            row = {key: values[i] for key, values in batch.items()}
            try:
                columns = self.row(row)
            except RowError as exc:
                columns = self.blank(str(exc))
            for name in names:
                out[name].append(columns[name])
        return out

    def blank(self, error: str) -> dict[str, Any]:
        """The columns of a bad row: `error` says why."""
        columns: dict[str, Any] = {name: [] for name in (KTO if self.kto else PAIRED)}
        columns.update(error=error, length=0, tokens=0, targets=0, digest=b"")
        return {**columns, "truncated": False, "too_long": False, "desirable": False}

    def row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """One raw row -> its columns; RowError says what is wrong with it."""
        desirable = _desirable(row.get(self.label_field), self.label_field) if self.kto else None
        prompt, replies = self.split(row)
        seqs = [self.sequence(prompt, reply) for reply in replies]
        if len(seqs) == 2:
            (chosen, _, pc), (rejected, _, pr) = seqs
            if chosen[:pc] != rejected[:pr]:
                raise RowError(
                    "the chat template renders the prompt differently before "
                    f"'{self.fields[0]}' and '{self.fields[1]}' ({pc} vs {pr} tokens); the "
                    "two sequences must share the prompt's tokens: use another "
                    "data.chat_template"
                )
        longest = max(len(ids) for ids, _, _ in seqs)
        too_long = longest > self.seq_len and not self.truncate
        truncated = longest > self.seq_len and self.truncate
        if truncated:
            seqs = self.fit(seqs)
        digest = hashlib.blake2b(digest_size=16)
        columns: dict[str, Any] = {}
        for (ids, labels, _), prefix in zip(seqs, ("chosen_", "rejected_"), strict=False):
            prefix = "" if self.kto else prefix
            columns[f"{prefix}input_ids"], columns[f"{prefix}labels"] = ids, labels
            for part in (ids, labels):
                digest.update(np.asarray([len(part), *part], dtype=np.int64).tobytes())
        digest.update(bytes([2 if desirable is None else int(desirable)]))
        return {
            **columns,
            "desirable": bool(desirable),
            "error": "",
            "length": max(len(ids) for ids, _, _ in seqs),
            "tokens": sum(len(ids) for ids, _, _ in seqs),
            "targets": sum(sum(label != IGNORE_INDEX for label in lb) for _, lb, _ in seqs),
            "truncated": truncated,
            "too_long": too_long,
            "digest": digest.digest(),
        }

    def split(self, row: Mapping[str, Any]) -> tuple[str | Messages, list[str]]:
        """(the prompt: text or messages, the completions' texts) of a row, in any of the
        layouts of the module docstring."""
        for name in self.fields:
            value = row.get(name)
            if value is None:
                what = "completion_field" if self.kto else f"{name}_field"
                raise RowError(f"row has no '{name}' field (see preference.{what})")
            if not isinstance(value, str | list):
                raise RowError(
                    f"'{name}' must be a string or a list of messages, got {type(value).__name__}"
                )
        prompt = row.get(self.prompt_field)
        if prompt is not None and not isinstance(prompt, str | list):
            raise RowError(
                f"'{self.prompt_field}' must be a string or a list of messages, "
                f"got {type(prompt).__name__}"
            )
        values = [row[name] for name in self.fields]
        if isinstance(prompt, list) or any(isinstance(v, list) for v in values):
            messages, replies = self.split_chat(prompt, values)
            out: tuple[str | Messages, list[str]] = (messages, replies)
        else:
            if prompt is None:
                raise RowError(
                    f"row has no '{self.prompt_field}' field (see preference.prompt_field)"
                )
            if not prompt.strip():
                raise RowError(f"'{self.prompt_field}' is empty")
            out = prompt, values
        for name, reply in zip(self.fields, out[1], strict=True):
            if not reply.strip():
                raise RowError(f"'{name}' is an empty completion")
        if len(out[1]) == 2 and out[1][0] == out[1][1]:
            raise RowError(f"'{self.fields[0]}' and '{self.fields[1]}' are the same completion")
        return out

    def split_chat(
        self, prompt: str | list[Any] | None, values: list[Any]
    ) -> tuple[Messages, list[str]]:
        """Chat layouts -> (the prompt's messages, the replies)."""
        given = _messages(prompt, self.prompt_field) if isinstance(prompt, list) else None
        replies: list[str] = []
        prefixes: list[Messages] = []
        for name, value in zip(self.fields, values, strict=True):
            if isinstance(value, str):
                replies.append(value)
                continue
            turns = _messages(value, name)
            if turns[-1]["role"] != "assistant":
                raise RowError(f"'{name}' must end with the assistant's turn")
            replies.append(turns[-1]["content"])
            if len(turns) > 1:  # a full conversation: what precedes the reply is the prompt
                prefixes.append(turns[:-1])
                if given is not None and turns[:-1] != given:
                    raise RowError(
                        f"'{name}' is neither a reply (a string or one assistant message) "
                        f"nor the messages of '{self.prompt_field}' followed by one reply"
                    )
        if any(p != prefixes[0] for p in prefixes):
            raise RowError(
                f"'{self.fields[0]}' and '{self.fields[1]}' differ before their last "
                "assistant turn (full conversations must share the prompt)"
            )
        if given is not None:
            messages = given
        elif prefixes:
            messages = prefixes[0]
        elif isinstance(prompt, str) and prompt.strip():
            messages = [{"role": "user", "content": prompt}]
        else:
            raise RowError(f"row has no '{self.prompt_field}' (and no full conversations)")
        if messages[-1]["role"] == "assistant":
            raise RowError(
                f"'{self.prompt_field}' ends with an assistant turn: the completion must "
                "answer a user (or tool) turn"
            )
        return messages, replies

    def sequence(self, prompt: str | Messages, reply: str) -> Encoded:
        """SFT's ids for the prompt plus `reply`; labels on the reply's tokens only (its
        span, up to and including the end-of-turn / eos SFT trains on)."""
        if isinstance(prompt, str) and self.chat_text_rows:
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(prompt, str):
            ids, labels = self.text({"instruction": prompt, "output": reply})
        else:
            ids, labels = self.chat(
                {"messages": [*prompt, {"role": "assistant", "content": reply}]}
            )
        # The reply is the last run of targets: earlier ones are the prompt's assistant
        # turns, separated from it by at least the next user turn's tokens.
        start = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=-1)
        if start < 0:
            raise RowError("the completion renders to no target tokens")
        while labels[start - 1] != IGNORE_INDEX:  # labels[0] is never a target
            start -= 1
        return ids, [IGNORE_INDEX] * start + labels[start:], start

    def fit(self, seqs: list[Encoded]) -> list[Encoded]:
        """Cut sequences to seq_len as the module docstring says, keeping one prompt."""
        n = self.seq_len
        prompt_len = seqs[0][2]
        completion = max(len(ids) - start for ids, _, start in seqs)
        keep = min(prompt_len, max(n - completion, n // 2))
        out = []
        for ids, labels, start in seqs:
            if len(ids) <= n and keep == start:
                out.append((ids, labels, start))
                continue
            head = 1 if keep >= 2 and self.bos is not None and ids[0] == self.bos else 0
            cut = list(range(head)) + list(range(start - (keep - head), start))
            cut += list(range(start, min(len(ids), start + n - keep)))
            new_labels = [labels[i] for i in cut]
            new_labels[0] = IGNORE_INDEX
            out.append(([ids[i] for i in cut], new_labels, keep))
        return out


def _messages(value: Any, field: str) -> Messages:
    if not value:
        raise RowError(f"'{field}' is an empty list of messages")
    try:
        return chat_messages({"messages": value})
    except RowError as exc:
        raise RowError(f"'{field}': {exc}") from None


def _desirable(value: Any, field: str) -> bool:
    """A kto label: a bool, 1 / 0, or "true" / "false" (any case) / "1" / "0"."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if value is None:
        raise RowError(f"row has no '{field}' field (kto's desirable label: data.label_field)")
    raise RowError(f"'{field}' must be true or false (or 1 / 0), got {value!r}")
