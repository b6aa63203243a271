"""Examples -> token ids and per-token completion masks, with truncation accounting.

Masks here are *token-aligned*: `completion_mask[i] == 1` means token `i` belongs to a completion
(it is a token the model should learn to produce). The batching stage shifts them onto next-token
targets (see `batching.py`).

How the completion is found in a chat (`Conversation`):

1. Render the full conversation with the tokenizer's chat template (ChatML when it has none) and
   tokenize it without adding special tokens (templates write their own BOS).
2. For every assistant turn that carries the loss, render the messages before it with the
   generation prompt (exactly what the model sees at inference) and the conversation up to and
   including it. If both tokenize to prefixes of the full ids (the "prefix property"), the turn's
   tokens lie between the two lengths.
3. Within the turn, the loss covers the assistant content and the template's end-of-turn marker
   (e.g. ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`); template text after the marker, such as
   ChatML's trailing newline, is not trained on.
4. If a template breaks the prefix property (e.g. it rewrites earlier turns), each assistant content
   is located in the rendered text and mapped to tokens through the tokenizer's character offsets,
   together with the special token that follows it. If that fails too, `DataError` is raised.

A `TextPair` (plain prompt/completion) is tokenized as `tokenizer(prompt)` (with the tokenizer's own
special tokens, e.g. BOS) followed by the completion's tokens and EOS; the completion and EOS are the
completion tokens. Tokenizing the two parts separately keeps the prompt identical to what the model
is given at inference.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from qlora_jax.data.formats import Conversation, Example, TextPair
from qlora_jax.data.sources import DataError

logger = logging.getLogger(__name__)

# Used when the tokenizer has no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

Overflow = Literal["truncate", "drop"]


class TruncationWarning(UserWarning):
    """Some examples were longer than `max_length` (truncated or dropped)."""


@dataclass(frozen=True)
class TokenizedExample:
    """One example as token ids.

    input_ids:       int32 [n]
    completion_mask: int8 [n], 1 on completion tokens (assistant content + end-of-turn marker).
    loss_mask:       int8 [n], 1 on tokens trained on: `completion_mask`, or all ones with
                     `train_on_prompt=True`. Token-aligned, see the module docstring.
    """

    input_ids: np.ndarray
    completion_mask: np.ndarray
    loss_mask: np.ndarray

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class TokenizeStats:
    """Counts from `tokenize_examples`; tokens are counted over kept examples after truncation."""

    examples: int = 0  # examples given
    kept: int = 0  # examples returned
    truncated: int = 0  # kept, but cut to max_length
    dropped_too_long: int = 0  # longer than max_length with overflow="drop"
    dropped_no_completion: int = 0  # no completion token left as a target after truncation
    total_tokens: int = 0
    completion_tokens: int = 0
    longest: int = 0  # longest example before truncation
    max_length: int = 0

    def summary(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    *,
    add_generation_prompt: bool = False,
    chat_template: str | None = None,
) -> str:
    """Render messages to text with `chat_template`, else the tokenizer's template, else ChatML."""
    template = chat_template or (None if has_chat_template(tokenizer) else CHATML_TEMPLATE)
    text = tokenizer.apply_chat_template(
        list(messages),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        chat_template=template,
    )
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered text; the template already wrote any special tokens it wants."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _is_prefix(prefix: Sequence[int], ids: Sequence[int]) -> bool:
    return len(prefix) <= len(ids) and list(ids[: len(prefix)]) == list(prefix)


class _PrefixBroken(Exception):
    pass


def _turn_spans_by_prefix(
    tokenizer: Any, conv: Conversation, full_ids: list[int], chat_template: str | None
) -> list[tuple[int, int]]:
    """Token spans [start, end) of each loss turn from prefix renders; `_PrefixBroken` if they fail."""
    spans = []
    for turn in conv.loss_turns:
        before = render_chat(
            tokenizer, conv.messages[:turn], add_generation_prompt=True, chat_template=chat_template
        )
        upto = render_chat(tokenizer, conv.messages[: turn + 1], chat_template=chat_template)
        if not upto.startswith(before):
            raise _PrefixBroken(f"turn {turn}: generation-prompt render is not a text prefix")
        before_ids = encode(tokenizer, before)
        if not _is_prefix(before_ids, full_ids) or not _is_prefix(encode(tokenizer, upto), full_ids):
            raise _PrefixBroken(f"turn {turn}: prefix renders do not tokenize to prefixes")
        # Trim the turn to content + end-of-turn marker.
        turn_text = upto[len(before) :]
        content = conv.messages[turn]["content"]
        pos = turn_text.find(content) if content else 0
        if pos < 0:
            raise _PrefixBroken(f"turn {turn}: the template changed the assistant content")
        head = turn_text[:pos]
        marker = turn_text[pos + len(content) :].rstrip()
        start_ids = encode(tokenizer, before + head)
        end_ids = encode(tokenizer, before + head + content + marker)
        if not _is_prefix(start_ids, full_ids) or not _is_prefix(end_ids, full_ids):
            raise _PrefixBroken(f"turn {turn}: content boundaries are not token boundaries")
        spans.append((len(start_ids), len(end_ids)))
    return spans


def _turn_spans_by_offsets(
    tokenizer: Any, conv: Conversation, full_text: str, full_ids: list[int]
) -> list[tuple[int, int]]:
    """Token spans of each loss turn found through character offsets (templates without prefix property)."""
    try:
        enc = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError) as err:
        raise DataError(
            "the chat template breaks the prefix property and the tokenizer gives no character "
            f"offsets to locate assistant turns: {err}"
        ) from err
    offsets = enc["offset_mapping"]
    if list(enc["input_ids"]) != list(full_ids):
        raise DataError("tokenizing with offsets changed the token ids")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    # Locate every message's content in order, so an assistant answer repeated in a prompt is skipped.
    cursor, char_spans = 0, {}
    for i, message in enumerate(conv.messages):
        content = message["content"]
        pos = full_text.find(content, cursor) if content else cursor
        if pos < 0:
            if i in conv.loss_turns:
                raise DataError(
                    f"cannot locate assistant turn {i} in the rendered conversation: the chat "
                    "template changes its content; loss masks cannot be computed"
                )
            continue
        char_spans[i] = (pos, pos + len(content))
        cursor = pos + len(content)
    spans = []
    for turn in conv.loss_turns:
        c0, c1 = char_spans[turn]
        toks = [t for t, (a, b) in enumerate(offsets) if b > a and a < c1 and b > c0]
        if not toks:
            raise DataError(f"assistant turn {turn} maps to no tokens")
        start, end = toks[0], toks[-1] + 1
        if end < len(full_ids) and full_ids[end] in special:
            end += 1  # the end-of-turn marker
        spans.append((start, end))
    return spans


def encode_conversation(
    tokenizer: Any, conv: Conversation, *, chat_template: str | None = None
) -> tuple[list[int], np.ndarray]:
    """Token ids of a rendered conversation and its token-aligned completion mask (int8)."""
    full_text = render_chat(tokenizer, conv.messages, chat_template=chat_template)
    full_ids = encode(tokenizer, full_text)
    try:
        spans = _turn_spans_by_prefix(tokenizer, conv, full_ids, chat_template)
    except _PrefixBroken as why:
        logger.debug("prefix property broken (%s); locating turns by offsets", why)
        spans = _turn_spans_by_offsets(tokenizer, conv, full_text, full_ids)
    mask = np.zeros(len(full_ids), np.int8)
    for start, end in spans:
        mask[start:end] = 1
    return full_ids, mask


def pad_id_of(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its end-of-sequence token
    (LLaMA-3 and SmolLM2 tokenizers have no pad token). Padding is masked out everywhere; one rule
    keeps the trainer, generation and evaluation agreeing on it."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad) if pad is not None else 0


def encode_text_pair(tokenizer: Any, pair: TextPair) -> tuple[list[int], np.ndarray]:
    """`tokenizer(prompt)` + completion tokens + EOS; the completion and EOS are masked in."""
    prompt_ids = list(tokenizer(pair.prompt)["input_ids"])
    completion_ids = encode(tokenizer, pair.completion)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        completion_ids.append(int(eos))
    mask = np.concatenate([np.zeros(len(prompt_ids), np.int8), np.ones(len(completion_ids), np.int8)])
    return prompt_ids + completion_ids, mask


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    max_length: int,
    train_on_prompt: bool = False,
    overflow: Overflow = "truncate",
    chat_template: str | None = None,
    source: str = "<examples>",
) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize examples, truncate (or drop) those over `max_length`, and count what happened.

    Args:
      examples: from `formats.to_examples`.
      tokenizer: a Hugging Face tokenizer.
      max_length: the longest allowed example, in tokens (the packed row / padded length cap).
      train_on_prompt: put the loss on every token, prompt included (padding never has loss).
      overflow: "truncate" keeps the first `max_length` tokens; "drop" removes the example.
      chat_template: a Jinja template overriding the tokenizer's.
      source: name used in messages.

    Examples whose completion has no token left as a target after truncation are dropped.
    Truncations and drops are reported with a `TruncationWarning` and a log line.

    Raises:
      DataError: a template error on some example, or no example left.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    chats = any(isinstance(e, Conversation) for e in examples)
    if chats and chat_template is None and not has_chat_template(tokenizer):
        logger.info("tokenizer has no chat template; rendering chats as ChatML")

    stats = TokenizeStats(examples=len(examples), max_length=max_length)
    out: list[TokenizedExample] = []
    for index, example in enumerate(examples):
        try:
            if isinstance(example, Conversation):
                ids, completion = encode_conversation(tokenizer, example, chat_template=chat_template)
            else:
                ids, completion = encode_text_pair(tokenizer, example)
        except DataError as err:
            raise DataError(f"{source}: example {index}: {err}") from None
        except Exception as err:  # jinja TemplateError (e.g. roles must alternate) and the like
            if type(err).__name__ in ("TemplateError", "TemplateSyntaxError", "UndefinedError"):
                raise DataError(f"{source}: example {index}: chat template error: {err}") from err
            raise
        n = len(ids)
        stats.longest = max(stats.longest, n)
        if n > max_length:
            if overflow == "drop":
                stats.dropped_too_long += 1
                continue
            ids, completion = ids[:max_length], completion[:max_length]
        # Token 0 is never a target (nothing precedes it), so it cannot carry the completion.
        if not completion[1:].any():
            stats.dropped_no_completion += 1
            continue
        if n > max_length:
            stats.truncated += 1
        loss = np.ones_like(completion) if train_on_prompt else completion.copy()
        out.append(TokenizedExample(np.asarray(ids, np.int32), completion, loss))
        stats.total_tokens += len(ids)
        stats.completion_tokens += int(completion.sum())
    stats.kept = len(out)

    if stats.truncated or stats.dropped_too_long or stats.dropped_no_completion:
        message = (
            f"{source}: {stats.truncated} of {stats.examples} examples truncated to max_length="
            f"{max_length}, {stats.dropped_too_long} dropped as too long, "
            f"{stats.dropped_no_completion} dropped with no completion token left "
            f"(longest: {stats.longest} tokens)"
        )
        logger.warning(message)
        warnings.warn(message, TruncationWarning, stacklevel=2)
    if not out:
        raise DataError(
            f"{source}: no examples left after tokenization ({stats.summary()}); "
            "raise max_length or check the data"
        )
    return out, stats
