"""Row formats -> one normalized example type.

Three row formats are understood, detected from the columns or named with `format=`:

  alpaca             {"instruction", "input" (optional), "output"}
  chat               {"messages": [{"role", "content"}, ...]}
  prompt_completion  {"prompt", "completion"}: both strings (plain text, as TRL's "standard"
                     prompt-completion), or both lists of messages (TRL's "conversational"
                     prompt-completion).

Each row becomes either a `Conversation` (messages to render with the chat template plus which
assistant turns carry the loss) or a `TextPair` (plain prompt and completion text, tokenized
without a template). Alpaca becomes a user message `instruction + "\\n\\n" + input` (just the
instruction when input is empty) and an assistant message `output`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from qlora_jax.data.sources import DataError

FORMATS = ("alpaca", "chat", "prompt_completion")
Format = Literal["alpaca", "chat", "prompt_completion"]
AssistantLoss = Literal["last", "all"]

# Fields each format requires (alpaca's "input" is optional).
REQUIRED_FIELDS = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
}


@dataclass(frozen=True)
class Conversation:
    """Messages rendered with the chat template.

    messages:   ({"role": str, "content": str}, ...)
    loss_turns: indices into `messages` of the assistant turns whose tokens carry the loss.
    """

    messages: tuple[dict[str, str], ...]
    loss_turns: tuple[int, ...]


@dataclass(frozen=True)
class TextPair:
    """Plain prompt + completion, tokenized without a chat template (an EOS token is appended)."""

    prompt: str
    completion: str


Example = Conversation | TextPair


def detect_format(columns: Iterable[str]) -> Format:
    """Pick the format from the column names; raise `DataError` if none or several fit."""
    cols = set(columns)
    found = [name for name, fields in REQUIRED_FIELDS.items() if set(fields) <= cols]
    if len(found) == 1:
        return found[0]  # type: ignore[return-value]
    if not found:
        raise DataError(
            f"cannot tell the data format from columns {sorted(cols)}: expected "
            + "; ".join(f"{n}: {list(f)}" for n, f in REQUIRED_FIELDS.items())
        )
    raise DataError(f"columns {sorted(cols)} fit several formats {found}; pass format= explicitly")


def _short(row: Mapping[str, Any], limit: int = 200) -> str:
    text = json.dumps(dict(row), ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


class _RowError(Exception):
    """Raised by a row converter; turned into `DataError` with the file and row number."""


def _message_list(value: Any, field: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise _RowError(f"field '{field}' must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise _RowError(f"{field}[{i}] is not a {{role, content}} object")
        for key in ("role", "content"):
            if m.get(key) is None:
                raise _RowError(f"{field}[{i}] is missing field '{key}'")
            if not isinstance(m[key], str):
                raise _RowError(f"{field}[{i}].{key} must be a string, got {type(m[key]).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _assistant_turns(messages: Sequence[Mapping[str, str]], start: int = 0) -> list[int]:
    return [i for i in range(start, len(messages)) if messages[i]["role"] == "assistant"]


def _text(value: Any, field: str) -> str:
    """A string field; numbers are accepted as text (CSV readers turn an all-digit column into ints)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise _RowError(f"field '{field}' must be a string, got {type(value).__name__}")


def alpaca_example(row: Mapping[str, Any]) -> Conversation:
    instruction, output = _text(row["instruction"], "instruction"), _text(row["output"], "output")
    extra = row.get("input")
    extra = "" if extra is None else _text(extra, "input")
    user = instruction + "\n\n" + extra if extra.strip() else instruction
    messages = ({"role": "user", "content": user}, {"role": "assistant", "content": output})
    return Conversation(messages=messages, loss_turns=(1,))


def chat_example(row: Mapping[str, Any], assistant_loss: AssistantLoss = "last") -> Conversation:
    messages = _message_list(row["messages"], "messages")
    turns = _assistant_turns(messages)
    if not turns:
        raise _RowError("field 'messages' has no assistant turn to train on")
    loss_turns = tuple(turns) if assistant_loss == "all" else (turns[-1],)
    return Conversation(messages=messages, loss_turns=loss_turns)


def prompt_completion_example(
    row: Mapping[str, Any], assistant_loss: AssistantLoss = "last"
) -> Example:
    prompt, completion = row["prompt"], row["completion"]
    if not isinstance(prompt, (list, tuple)) and not isinstance(completion, (list, tuple)):
        return TextPair(prompt=_text(prompt, "prompt"), completion=_text(completion, "completion"))
    if not isinstance(prompt, (list, tuple)) or not isinstance(completion, (list, tuple)):
        raise _RowError("'prompt' and 'completion' must both be strings or both be lists of messages")
    prompt_msgs = _message_list(prompt, "prompt")
    completion_msgs = _message_list(completion, "completion")
    messages = prompt_msgs + completion_msgs
    turns = _assistant_turns(messages, start=len(prompt_msgs))
    if not turns:
        raise _RowError("field 'completion' has no assistant message")
    # The completion is what is trained on; "last" keeps only its final assistant turn.
    loss_turns = tuple(turns) if assistant_loss == "all" else (turns[-1],)
    return Conversation(messages=messages, loss_turns=loss_turns)


def text_pair_as_chat(pair: TextPair) -> Conversation:
    """Wrap a plain prompt/completion into a user/assistant exchange (for instruct models)."""
    messages = ({"role": "user", "content": pair.prompt}, {"role": "assistant", "content": pair.completion})
    return Conversation(messages=messages, loss_turns=(1,))


def to_examples(
    rows: Any,
    *,
    format: Format | None = None,
    assistant_loss: AssistantLoss = "last",
    text_as_chat: bool = False,
    source: str = "<rows>",
) -> list[Example]:
    """Convert rows (a `datasets.Dataset` or a list of dicts) into `Example`s.

    Args:
      rows: the data; a `datasets.Dataset` or a sequence of mappings.
      format: one of `FORMATS`, or None to detect from the columns.
      assistant_loss: "last" trains only the final assistant turn of a chat (the default);
        "all" trains every assistant turn.
      text_as_chat: wrap string prompt/completion rows into a user/assistant chat (rendered with
        the chat template) instead of tokenizing them as plain text.
      source: file or dataset name used in error messages.

    Raises:
      DataError: naming the missing/invalid field, the format, `source` and the first offending row.
    """
    if assistant_loss not in ("last", "all"):
        raise ValueError(f"assistant_loss must be 'last' or 'all', got {assistant_loss!r}")
    columns = rows.column_names if hasattr(rows, "column_names") else _columns_of(rows)
    if len(rows) == 0:
        raise DataError(f"{source}: the dataset has no rows")
    if format is None:
        try:
            format = detect_format(columns)
        except DataError as err:
            raise DataError(f"{source}: {err}") from None
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")

    for field in REQUIRED_FIELDS[format]:
        if field not in columns:
            raise DataError(
                f"{source}: field '{field}' missing for format '{format}' "
                f"(columns: {sorted(columns)}); first offending row: 0"
            )

    examples: list[Example] = []
    for index, row in enumerate(rows):
        try:
            for field in REQUIRED_FIELDS[format]:
                if row.get(field) is None:
                    raise _RowError(f"field '{field}' missing")
            if format == "alpaca":
                example: Example = alpaca_example(row)
            elif format == "chat":
                example = chat_example(row, assistant_loss)
            else:
                example = prompt_completion_example(row, assistant_loss)
        except _RowError as err:
            raise DataError(
                f"{source}: {err} (format '{format}'); first offending row: {index}: {_short(row)}"
            ) from None
        if text_as_chat and isinstance(example, TextPair):
            example = text_pair_as_chat(example)
        examples.append(example)
    return examples


def _columns_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for row in rows:
        cols.update(dict.fromkeys(row))
    return list(cols)
