"""Preference pairs (prompt, chosen, rejected) -> token ids, completion masks and pair batches (DPO).

Row formats, as TRL's preference datasets (detected from the columns):

  explicit prompt   {"prompt", "chosen", "rejected"}: three strings (TRL "standard"), or three lists of
                    messages (TRL "conversational": the prompt's user/system turns, then the chosen
                    and rejected assistant turns).
  implicit prompt   {"chosen", "rejected"}: two full conversations (lists of messages) or two strings
                    that begin with the same prompt; the prompt is their longest common prefix of
                    messages (or characters), as ``trl.extract_prompt`` does.

A conversational ``chosen`` that already starts with the prompt's messages (some hub datasets store
the whole conversation there and a copy of the prompt in ``prompt``) is not prefixed twice, and a
string prompt with message-list completions becomes a user message.

Each side becomes an ``Example`` of the SFT pipeline and is tokenized by it (``tokenize.py``):
conversations are rendered with the chat template and the completion mask covers the assistant
content and its end-of-turn marker; string pairs are ``tokenizer(prompt)`` + completion + EOS. So
chosen and rejected share the prompt's tokens exactly. (TRL also counts the template's text after the
end-of-turn marker, ChatML's newline, as completion; we do not, as in SFT.)

Batches: ``batch_size`` pairs make ``2 * batch_size`` rows, chosen and rejected interleaved
(row ``2i`` = chosen of pair ``i``, row ``2i + 1`` = its rejected), in the SFT batch layout
(``input_ids``, ``targets``, ``loss_mask``, ``segment_ids``, ``positions``; see ``batching.py``).
One forward pass computes both sides, and a pair's two rows sit next to each other on the batch axis
(on the same device whenever a device holds an even number of rows). A pair with an all-zero
``loss_mask`` is padding.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from qlora_jax.data.batching import collate, length_grouped_order, round_up
from qlora_jax.data.formats import Conversation, Example, TextPair, _message_list, _RowError, _short, _text
from qlora_jax.data.sources import DataError, describe_source, load_rows
from qlora_jax.data.tokenize import (
    TokenizedExample,
    TruncationWarning,
    encode_conversation,
    encode_text_pair,
    has_chat_template,
)

logger = logging.getLogger(__name__)

# Distinct from batching.py's streams, so pair orders never coincide with SFT orders by accident.
_PAIR_EPOCH_STREAM = 0x50414952


@dataclass(frozen=True)
class PreferenceExample:
    """One pair before tokenization: two examples with the same prompt."""

    chosen: Example
    rejected: Example


@dataclass(frozen=True)
class TokenizedPair:
    """Chosen and rejected sequences; each ``loss_mask`` is its completion mask (token-aligned)."""

    chosen: TokenizedExample
    rejected: TokenizedExample

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


@dataclass
class PreferenceStats:
    """Counts from ``tokenize_pairs``; token counts are over kept pairs after truncation."""

    pairs: int = 0  # pairs given
    kept: int = 0  # pairs returned
    truncated: int = 0  # kept, but the chosen or the rejected sequence was cut to max_length
    dropped_too_long: int = 0  # a side longer than max_length with overflow="drop"
    dropped_no_completion: int = 0  # a side had no completion token left as a target after truncation
    prompt_tokens: int = 0
    chosen_tokens: int = 0  # completion tokens of the chosen sides
    rejected_tokens: int = 0
    longest: int = 0  # longest sequence before truncation
    max_length: int = 0

    def summary(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


# -- rows -> examples ------------------------------------------------------------------------------


def _is_messages(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _common_prefix_messages(a: Sequence[Mapping], b: Sequence[Mapping]) -> int:
    n = 0
    while n < min(len(a), len(b)) and dict(a[n]) == dict(b[n]):
        n += 1
    return n


def _common_prefix_text(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    if 0 < n < min(len(a), len(b)) and a[n - 1] == " ":
        n -= 1  # the space before the answers belongs to the completions (as trl.extract_prompt)
    return n


def _conversation(prompt: tuple[dict[str, str], ...], completion: tuple[dict[str, str], ...], side: str) -> Conversation:
    messages = prompt + completion
    turns = tuple(i for i in range(len(prompt), len(messages)) if messages[i]["role"] == "assistant")
    if not turns:
        raise _RowError(f"'{side}' has no assistant message after the prompt")
    return Conversation(messages=messages, loss_turns=turns)


def preference_example(row: Mapping[str, Any], *, text_as_chat: bool = False) -> PreferenceExample:
    """One row -> a pair of examples sharing the prompt (see the module docstring for the formats)."""
    for field in ("chosen", "rejected"):
        if row.get(field) is None:
            raise _RowError(f"field '{field}' missing")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if _is_messages(chosen) != _is_messages(rejected):
        raise _RowError("'chosen' and 'rejected' must both be strings or both be lists of messages")

    if not _is_messages(chosen):  # strings
        chosen, rejected = _text(chosen, "chosen"), _text(rejected, "rejected")
        if prompt is None:
            n = _common_prefix_text(chosen, rejected)
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        elif _is_messages(prompt):
            raise _RowError("a message-list 'prompt' needs message-list 'chosen' and 'rejected'")
        prompt = _text(prompt, "prompt")
        if not chosen or not rejected:
            raise _RowError("'chosen' or 'rejected' is empty after the prompt")
        if text_as_chat:
            user = ({"role": "user", "content": prompt},)
            return PreferenceExample(
                _conversation(user, ({"role": "assistant", "content": chosen},), "chosen"),
                _conversation(user, ({"role": "assistant", "content": rejected},), "rejected"),
            )
        return PreferenceExample(TextPair(prompt, chosen), TextPair(prompt, rejected))

    chosen_msgs = _message_list(chosen, "chosen")
    rejected_msgs = _message_list(rejected, "rejected")
    if prompt is None:
        prompt_msgs: tuple[dict[str, str], ...] = ()
    elif _is_messages(prompt):
        prompt_msgs = _message_list(prompt, "prompt")
    else:
        prompt_msgs = ({"role": "user", "content": _text(prompt, "prompt")},)
    # Completions that already contain the prompt (hub datasets often store whole conversations).
    if prompt_msgs and all(_common_prefix_messages(prompt_msgs, c) == len(prompt_msgs)
                           for c in (chosen_msgs, rejected_msgs)):
        chosen_msgs, rejected_msgs = chosen_msgs[len(prompt_msgs):], rejected_msgs[len(prompt_msgs):]
    if not prompt_msgs:  # implicit prompt: the shared leading messages
        n = _common_prefix_messages(chosen_msgs, rejected_msgs)
        prompt_msgs, chosen_msgs, rejected_msgs = chosen_msgs[:n], chosen_msgs[n:], rejected_msgs[n:]
        if not prompt_msgs:
            raise _RowError("'chosen' and 'rejected' share no leading messages to use as the prompt")
    if not chosen_msgs or not rejected_msgs:
        raise _RowError("'chosen' or 'rejected' has no message after the prompt")
    return PreferenceExample(
        _conversation(prompt_msgs, chosen_msgs, "chosen"),
        _conversation(prompt_msgs, rejected_msgs, "rejected"),
    )


def to_preference_examples(rows: Any, *, text_as_chat: bool = False, source: str = "<rows>") -> list[PreferenceExample]:
    """Rows (a ``datasets.Dataset`` or a list of dicts) -> ``PreferenceExample``s.

    Raises:
      DataError: naming the source, the first offending row and what is wrong with it.
    """
    columns = set(rows.column_names if hasattr(rows, "column_names") else {k for r in rows for k in r})
    if len(rows) == 0:
        raise DataError(f"{source}: the dataset has no rows")
    missing = {"chosen", "rejected"} - columns
    if missing:
        raise DataError(
            f"{source}: preference data needs columns 'chosen' and 'rejected' (and optionally 'prompt'); "
            f"missing {sorted(missing)} (columns: {sorted(columns)})"
        )
    out = []
    for index, row in enumerate(rows):
        try:
            out.append(preference_example(row, text_as_chat=text_as_chat))
        except _RowError as err:
            raise DataError(f"{source}: {err} (preference data); first offending row: {index}: {_short(row)}") from None
    return out


# -- examples -> tokens ----------------------------------------------------------------------------


def _encode(tokenizer: Any, example: Example, chat_template: str | None) -> tuple[list[int], np.ndarray]:
    if isinstance(example, Conversation):
        return encode_conversation(tokenizer, example, chat_template=chat_template)
    return encode_text_pair(tokenizer, example)


def tokenize_pairs(
    examples: Sequence[PreferenceExample],
    tokenizer: Any,
    *,
    max_length: int,
    overflow: str = "truncate",
    chat_template: str | None = None,
    source: str = "<pairs>",
) -> tuple[list[TokenizedPair], PreferenceStats]:
    """Tokenize both sides of every pair; truncate (keep the start) or drop sides over ``max_length``.

    A pair is dropped when either side has no completion token left as a target, so every kept pair
    compares two non-empty completions. Truncations and drops are counted, logged and warned about
    (``TruncationWarning``).

    Raises:
      DataError: a template error on some pair, or no pair left.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    if chat_template is None and not has_chat_template(tokenizer) and any(
            isinstance(e.chosen, Conversation) for e in examples):
        logger.info("tokenizer has no chat template; rendering chats as ChatML")
    stats = PreferenceStats(pairs=len(examples), max_length=max_length)
    out: list[TokenizedPair] = []
    for index, example in enumerate(examples):
        sides = []
        try:
            for side in (example.chosen, example.rejected):
                sides.append(_encode(tokenizer, side, chat_template))
        except DataError as err:
            raise DataError(f"{source}: pair {index}: {err}") from None
        except Exception as err:  # jinja TemplateError and the like
            if type(err).__name__ in ("TemplateError", "TemplateSyntaxError", "UndefinedError"):
                raise DataError(f"{source}: pair {index}: chat template error: {err}") from err
            raise
        lengths = [len(ids) for ids, _ in sides]
        stats.longest = max(stats.longest, *lengths)
        too_long = max(lengths) > max_length
        if too_long and overflow == "drop":
            stats.dropped_too_long += 1
            continue
        sides = [(ids[:max_length], mask[:max_length]) for ids, mask in sides]
        if any(not mask[1:].any() for _, mask in sides):  # token 0 is never a target
            stats.dropped_no_completion += 1
            continue
        stats.truncated += int(too_long)
        (c_ids, c_mask), (r_ids, r_mask) = sides
        out.append(TokenizedPair(
            TokenizedExample(np.asarray(c_ids, np.int32), c_mask, c_mask.copy()),
            TokenizedExample(np.asarray(r_ids, np.int32), r_mask, r_mask.copy()),
        ))
        stats.prompt_tokens += int(np.argmax(c_mask))
        stats.chosen_tokens += int(c_mask.sum())
        stats.rejected_tokens += int(r_mask.sum())
    stats.kept = len(out)
    if stats.truncated or stats.dropped_too_long or stats.dropped_no_completion:
        message = (
            f"{source}: {stats.truncated} of {stats.pairs} preference pairs truncated to max_length="
            f"{max_length}, {stats.dropped_too_long} dropped as too long, {stats.dropped_no_completion} "
            f"dropped with no completion token left (longest sequence: {stats.longest} tokens)"
        )
        logger.warning(message)
        warnings.warn(message, TruncationWarning, stacklevel=2)
    if not out:
        raise DataError(f"{source}: no preference pairs left after tokenization ({stats.summary()}); "
                        "raise max_length or check the data")
    return out, stats


def prepare_preference(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: Any,
    *,
    max_length: int,
    overflow: str = "truncate",
    text_as_chat: bool = False,
    chat_template: str | None = None,
    split: str = "train",
    **load_kwargs: Any,
) -> tuple[list[TokenizedPair], PreferenceStats]:
    """Load ``source``, turn its rows into pairs and tokenize them."""
    name = describe_source(source)
    rows = load_rows(source, split=split, **load_kwargs)
    examples = to_preference_examples(rows, text_as_chat=text_as_chat, source=name)
    return tokenize_pairs(examples, tokenizer, max_length=max_length, overflow=overflow,
                          chat_template=chat_template, source=name)


# -- pairs -> batches ------------------------------------------------------------------------------


def collate_pairs(
    pairs: Sequence[TokenizedPair], indices: Sequence[int], *, num_pairs: int, length: int, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """``[2 * num_pairs, length]`` arrays, rows chosen/rejected interleaved; missing pairs are padding."""
    flat = [side for i in indices for side in (pairs[i].chosen, pairs[i].rejected)]
    rows = [[j] for j in range(len(flat))]
    return collate(flat, rows, num_rows=2 * num_pairs, length=length, pad_id=pad_id)


class PreferenceBatchIterator(Iterator[dict[str, np.ndarray]]):
    """Deterministic, resumable iterator of pair batches; the same contract as ``BatchIterator``.

    The order of every epoch is a pure function of (seed, epoch); ``state()`` / ``restore()`` carry
    ``{"epoch", "step", "fingerprint"}``. Each batch is padded to its longest sequence rounded up to
    ``pad_to_multiple_of``; ``group_by_length`` puts pairs of similar length together.
    """

    def __init__(
        self,
        pairs: Sequence[TokenizedPair],
        *,
        batch_size: int,
        seq_len: int,
        group_by_length: bool = True,
        mega_batch_size: int = 50,
        pad_to_multiple_of: int = 64,
        pad_id: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
    ):
        if not pairs:
            raise ValueError("no preference pairs to batch")
        if batch_size < 1 or seq_len < 2:
            raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size}, {seq_len}")
        self.pairs = list(pairs)
        self.lengths = np.array([len(p) for p in self.pairs], np.int64)
        if self.lengths.max() > seq_len:
            raise ValueError(f"a pair has a {self.lengths.max()}-token sequence > seq_len={seq_len}; "
                             "tokenize with max_length <= seq_len")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.group_by_length = group_by_length
        self.mega_batch_size = mega_batch_size
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_id = pad_id
        self.seed = seed
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.steps_per_epoch = -(-len(self.pairs) // batch_size)
        self.fingerprint = self._fingerprint()
        self.epoch = 0
        self.step = 0
        self._plan_epoch: int | None = None
        self._plan: list[np.ndarray] = []

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """The batches of ``epoch``, each an array of pair indices."""
        n = len(self.pairs)
        if not self.shuffle:
            return [np.arange(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)]
        rng = np.random.default_rng([_PAIR_EPOCH_STREAM, self.seed, epoch])
        if self.group_by_length:
            return length_grouped_order(self.lengths, self.batch_size, self.mega_batch_size, rng)
        perm = rng.permutation(n)
        return [perm[i:i + self.batch_size] for i in range(0, n, self.batch_size)]

    def batch_at(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        if self._plan_epoch != epoch:
            self._plan, self._plan_epoch = self.epoch_plan(epoch), epoch
        indices = self._plan[step]
        longest = int(self.lengths[indices].max())
        length = min(round_up(longest, self.pad_to_multiple_of), self.seq_len)
        return collate_pairs(self.pairs, indices, num_pairs=self.batch_size, length=length, pad_id=self.pad_id)

    def __iter__(self) -> PreferenceBatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        batch = self.batch_at(self.epoch, self.step)
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batch

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "fingerprint": self.fingerprint}

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") not in (None, self.fingerprint):
            raise ValueError("the saved data-iterator state belongs to different preference data or batching "
                             f"settings (fingerprint {state['fingerprint']} != {self.fingerprint})")
        epoch, step = int(state["epoch"]), int(state["step"])
        if not 0 <= step < self.steps_per_epoch or epoch < 0:
            raise ValueError(f"invalid state epoch={epoch} step={step} (steps_per_epoch={self.steps_per_epoch})")
        self.epoch, self.step = epoch, step

    def _fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        settings = ("pairs", self.batch_size, self.seq_len, self.group_by_length, self.mega_batch_size,
                    self.pad_to_multiple_of, self.pad_id, self.seed, self.shuffle)
        h.update(repr(settings).encode())
        for p in self.pairs:
            for side in (p.chosen, p.rejected):
                h.update(side.input_ids.tobytes())
                h.update(side.loss_mask.tobytes())
        return h.hexdigest()


__all__ = [
    "PreferenceBatchIterator", "PreferenceExample", "PreferenceStats", "TokenizedPair", "collate_pairs",
    "preference_example", "prepare_preference", "to_preference_examples", "tokenize_pairs",
]
