"""Unpaired preference data (KTO): (prompt, completion, label) rows -> token ids and KTO batches.

Row formats, as trl's ``KTOTrainer`` reads them:

  unpaired          {"prompt", "completion", "label"}: prompt and completion both strings (trl
                    "standard") or both lists of messages (trl "conversational"); ``label`` is
                    true (desirable) or false (undesirable).
  paired            {"prompt", "chosen", "rejected"} or {"chosen", "rejected"} (``preference.py``'s
                    formats): each pair becomes a desirable and an undesirable row with the same
                    prompt, as ``trl.data_utils.unpair_preference_dataset`` does.

Each row is tokenized as the SFT and DPO pipelines do (chat template for conversations, the
completion mask over the assistant content and its end-of-turn marker; strings as
``tokenizer(prompt)`` + completion + EOS). A row's prompt tokens are those before its first
completion token; everything from there on is its completion.

Batches: ``batch_size`` rows in the SFT layout (``input_ids``, ``targets``, ``loss_mask``,
``segment_ids``, ``positions``), the same keys prefixed ``kl_`` for the mismatched KL rows (row
i's prompt with the completion of row i - 1 of the batch, row 0 with the last row's: trl's
rotation; cut to ``seq_len``), and ``desirable`` (the label repeated along the row). All arrays
have one width; padding rows have an all-zero ``loss_mask``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from qlora_jax.data.batching import collate, round_up
from qlora_jax.data.formats import (
    Example,
    TextPair,
    _RowError,
    _short,
    prompt_completion_example,
    text_pair_as_chat,
)
from qlora_jax.data.preference import PreferenceBatchIterator, _encode, preference_example
from qlora_jax.data.sources import DataError, describe_source, load_rows
from qlora_jax.data.tokenize import TokenizedExample, TruncationWarning

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnpairedExample:
    """One row before tokenization."""

    example: Example
    desirable: bool


@dataclass(frozen=True)
class TokenizedUnpaired:
    """One tokenized row; ``prompt_length`` tokens come before its completion."""

    example: TokenizedExample
    desirable: bool
    prompt_length: int

    def __len__(self) -> int:
        return len(self.example)


@dataclass
class UnpairedStats:
    """Counts from ``tokenize_unpaired``; token counts are over kept rows after truncation."""

    rows: int = 0  # rows given (a pair counts as two)
    kept: int = 0
    desirable: int = 0  # kept desirable rows
    undesirable: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_completion: int = 0
    longest: int = 0
    max_length: int = 0

    def summary(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


# -- rows -> examples ------------------------------------------------------------------------------


def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    raise _RowError(f"field 'label' must be true or false, got {value!r}")


def unpaired_examples(row: Mapping[str, Any], *, text_as_chat: bool = False) -> list[UnpairedExample]:
    """One row -> one labelled example (or two, desirable and undesirable, from a pair)."""
    if "chosen" in row and "rejected" in row and row.get("completion") is None:
        pair = preference_example(row, text_as_chat=text_as_chat)
        return [UnpairedExample(pair.chosen, True), UnpairedExample(pair.rejected, False)]
    for field in ("prompt", "completion", "label"):
        if row.get(field) is None:
            raise _RowError(f"field '{field}' missing")
    example = prompt_completion_example(row, assistant_loss="all")
    if isinstance(example, TextPair):
        if not example.completion:
            raise _RowError("'completion' is empty")
        if text_as_chat:
            example = text_pair_as_chat(example)
    return [UnpairedExample(example, _label(row["label"]))]


def _row_location(source: Any, index: int) -> str:
    """``file:line`` of row ``index`` of a single local JSON Lines file (blank lines skipped, as
    the loader does), else ``source: row index``."""
    name = describe_source(source)
    if isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(".jsonl") and os.path.isfile(source):
        seen = -1
        with open(source, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if raw.strip():
                    seen += 1
                    if seen == index:
                        return f"{name}:{lineno}"
    return f"{name}: row {index}"


def to_unpaired_examples(rows: Any, *, text_as_chat: bool = False, source: Any = "<rows>") -> list[UnpairedExample]:
    """Rows (a ``datasets.Dataset`` or a list of dicts) -> labelled examples.

    Raises:
      DataError: naming the columns, or the file and line of the first bad row and what is wrong.
    """
    name = describe_source(source) if not isinstance(source, str) else source
    if len(rows) == 0:
        raise DataError(f"{name}: the dataset has no rows")
    columns = set(rows.column_names if hasattr(rows, "column_names") else {k for r in rows for k in r})
    if not ({"prompt", "completion", "label"} <= columns or {"chosen", "rejected"} <= columns):
        raise DataError(f"{name}: KTO data needs columns 'prompt', 'completion', 'label' (or preference pairs: "
                        f"'chosen', 'rejected', optionally 'prompt'); columns: {sorted(columns)}")
    out: list[UnpairedExample] = []
    for index, row in enumerate(rows):
        try:
            out.extend(unpaired_examples(row, text_as_chat=text_as_chat))
        except _RowError as err:
            raise DataError(f"{_row_location(source, index)}: {err} (KTO data): {_short(row)}") from None
    return out


# -- examples -> tokens ----------------------------------------------------------------------------


def tokenize_unpaired(examples: Sequence[UnpairedExample], tokenizer: Any, *, max_length: int,
                      overflow: str = "truncate", chat_template: str | None = None,
                      source: str = "<rows>") -> tuple[list[TokenizedUnpaired], UnpairedStats]:
    """Tokenize every row; truncate (keep the start) or drop rows over ``max_length``; drop rows with
    no completion token left as a target. Truncations and drops are logged and warned about.

    Raises:
      DataError: a template error on some row, or no row left.
    """
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    stats = UnpairedStats(rows=len(examples), max_length=max_length)
    out: list[TokenizedUnpaired] = []
    for index, ex in enumerate(examples):
        try:
            ids, mask = _encode(tokenizer, ex.example, chat_template)
        except DataError as err:
            raise DataError(f"{source}: example {index}: {err}") from None
        except Exception as err:  # jinja TemplateError and the like
            if type(err).__name__ in ("TemplateError", "TemplateSyntaxError", "UndefinedError"):
                raise DataError(f"{source}: example {index}: chat template error: {err}") from err
            raise
        stats.longest = max(stats.longest, len(ids))
        too_long = len(ids) > max_length
        if too_long and overflow == "drop":
            stats.dropped_too_long += 1
            continue
        ids, mask = np.asarray(ids[:max_length], np.int32), np.asarray(mask[:max_length], np.int8)
        if not mask[1:].any():  # token 0 is never a target
            stats.dropped_no_completion += 1
            continue
        stats.truncated += int(too_long)
        out.append(TokenizedUnpaired(TokenizedExample(ids, mask, mask.copy()), ex.desirable, int(np.argmax(mask))))
        stats.desirable += int(ex.desirable)
        stats.undesirable += int(not ex.desirable)
    stats.kept = len(out)
    if stats.truncated or stats.dropped_too_long or stats.dropped_no_completion:
        message = (f"{source}: {stats.truncated} of {stats.rows} KTO rows truncated to max_length={max_length}, "
                   f"{stats.dropped_too_long} dropped as too long, {stats.dropped_no_completion} dropped with no "
                   f"completion token left (longest sequence: {stats.longest} tokens)")
        logger.warning(message)
        warnings.warn(message, TruncationWarning, stacklevel=2)
    if not out:
        raise DataError(f"{source}: no KTO rows left after tokenization ({stats.summary()}); "
                        "raise max_length or check the data")
    return out, stats


def prepare_unpaired(source: Any, tokenizer: Any, *, max_length: int, overflow: str = "truncate",
                     text_as_chat: bool = False, chat_template: str | None = None, split: str = "train",
                     **load_kwargs: Any) -> tuple[list[TokenizedUnpaired], UnpairedStats]:
    """Load ``source``, read its rows as KTO examples and tokenize them."""
    rows = load_rows(source, split=split, **load_kwargs)
    examples = to_unpaired_examples(rows, text_as_chat=text_as_chat, source=source)
    return tokenize_unpaired(examples, tokenizer, max_length=max_length, overflow=overflow,
                             chat_template=chat_template, source=describe_source(source))


# -- rows -> batches -------------------------------------------------------------------------------


def kl_example(row: TokenizedUnpaired, other: TokenizedUnpaired, max_length: int) -> TokenizedExample:
    """``row``'s prompt followed by ``other``'s completion (completion-masked), cut to ``max_length``."""
    p, q = row.prompt_length, other.prompt_length
    ids = np.concatenate([row.example.input_ids[:p], other.example.input_ids[q:]])[:max_length]
    mask = np.concatenate([np.zeros(p, np.int8), other.example.loss_mask[q:]])[:max_length]
    return TokenizedExample(ids.astype(np.int32), mask, mask.copy())


def collate_unpaired(items: Sequence[TokenizedUnpaired], indices: Sequence[int], *, num_rows: int, seq_len: int,
                     pad_to_multiple_of: int = 64, pad_id: int = 0) -> dict[str, np.ndarray]:
    """``[num_rows, width]`` arrays of the rows ``indices``, their KL rows and labels (module docstring)."""
    rows = [items[i] for i in indices]
    kl = [kl_example(r, rows[k - 1], seq_len) for k, r in enumerate(rows)]
    longest = max(max(len(r) for r in rows), max(len(e) for e in kl))
    width = min(round_up(longest, pad_to_multiple_of), seq_len)
    layout = [[j] for j in range(len(rows))]
    batch = collate([r.example for r in rows], layout, num_rows=num_rows, length=width, pad_id=pad_id)
    batch.update({"kl_" + k: v for k, v in collate(kl, layout, num_rows=num_rows, length=width,
                                                    pad_id=pad_id).items()})
    desirable = np.zeros((num_rows, width), np.int32)
    desirable[:len(rows)] = np.asarray([r.desirable for r in rows], np.int32)[:, None]
    batch["desirable"] = desirable
    return batch


class UnpairedBatchIterator(PreferenceBatchIterator):
    """Deterministic, resumable iterator of KTO batches: ``PreferenceBatchIterator``'s order, state
    and fingerprint contract over single rows (``batch_size`` rows per batch)."""

    def __init__(self, rows: Sequence[TokenizedUnpaired], **kwargs: Any):
        super().__init__(rows, **kwargs)

    def batch_at(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        if self._plan_epoch != epoch:
            self._plan, self._plan_epoch = self.epoch_plan(epoch), epoch
        return collate_unpaired(self.pairs, self._plan[step], num_rows=self.batch_size, seq_len=self.seq_len,
                                pad_to_multiple_of=self.pad_to_multiple_of, pad_id=self.pad_id)

    def _fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        settings = ("unpaired", self.batch_size, self.seq_len, self.group_by_length, self.mega_batch_size,
                    self.pad_to_multiple_of, self.pad_id, self.seed, self.shuffle)
        h.update(repr(settings).encode())
        for r in self.pairs:
            h.update(r.example.input_ids.tobytes())
            h.update(r.example.loss_mask.tobytes())
            h.update(bytes([r.desirable]))
        return h.hexdigest()


__all__ = ["TokenizedUnpaired", "UnpairedBatchIterator", "UnpairedExample", "UnpairedStats", "collate_unpaired",
           "kl_example", "prepare_unpaired", "to_unpaired_examples", "tokenize_unpaired", "unpaired_examples"]
