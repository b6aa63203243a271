"""Data stage: datasets -> chat templates -> token ids, loss masks, packing, batches.

    rows     = load_rows("data/sft_demo/train.jsonl")             # sources.py
    examples = to_examples(rows, format=None)                     # formats.py (auto-detected)
    tokens, stats = tokenize_examples(examples, tok, max_length=128)  # tokenize.py
    batches  = BatchIterator(tokens, batch_size=8, seq_len=128, pack=True, seed=0)  # batching.py

`prepare_sft` runs the first three steps. Batch layout (next-token `targets`, target-aligned
`loss_mask`, `segment_ids`, `positions`) is documented in `batching.py`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from qlora_jax.data.batching import (
    BATCH_KEYS,
    BatchIterator,
    collate,
    length_grouped_order,
    pack_rows,
    steps_per_epoch,
)
from qlora_jax.data.formats import (
    FORMATS,
    Conversation,
    Example,
    TextPair,
    detect_format,
    to_examples,
)
from qlora_jax.data.sources import DataError, describe_source, load_rows, validate_jsonl
from qlora_jax.data.tokenize import (
    CHATML_TEMPLATE,
    TokenizedExample,
    TokenizeStats,
    TruncationWarning,
    encode_conversation,
    encode_text_pair,
    render_chat,
    tokenize_examples,
)


def prepare_sft(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: Any,
    *,
    max_length: int,
    format: str | None = None,
    assistant_loss: str = "last",
    train_on_prompt: bool = False,
    overflow: str = "truncate",
    text_as_chat: bool = False,
    chat_template: str | None = None,
    split: str = "train",
    **load_kwargs: Any,
) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Load `source`, convert its rows and tokenize them (see each step for the arguments)."""
    name = describe_source(source)
    rows = load_rows(source, split=split, **load_kwargs)
    examples = to_examples(
        rows, format=format, assistant_loss=assistant_loss, text_as_chat=text_as_chat, source=name
    )
    return tokenize_examples(
        examples,
        tokenizer,
        max_length=max_length,
        train_on_prompt=train_on_prompt,
        overflow=overflow,
        chat_template=chat_template,
        source=name,
    )


__all__ = [
    "BATCH_KEYS",
    "CHATML_TEMPLATE",
    "FORMATS",
    "BatchIterator",
    "Conversation",
    "DataError",
    "Example",
    "TextPair",
    "TokenizeStats",
    "TokenizedExample",
    "TruncationWarning",
    "collate",
    "detect_format",
    "encode_conversation",
    "encode_text_pair",
    "length_grouped_order",
    "load_rows",
    "pack_rows",
    "prepare_sft",
    "render_chat",
    "steps_per_epoch",
    "to_examples",
    "tokenize_examples",
    "validate_jsonl",
]
