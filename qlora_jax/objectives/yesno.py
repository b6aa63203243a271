"""The yes/no objective: answers restricted to two single tokens, scored by a masked softmax.

A yes/no question is answered by the first token of the assistant turn. Every vocabulary entry
except the two answer tokens is masked out of the final softmax, so

    log p(yes) = z_yes / T - logsumexp(z_yes / T, z_no / T)        (z: logits, T: temperature)
    log p(no)  = z_no  / T - logsumexp(z_yes / T, z_no / T)
    prediction = argmax (yes on a tie),  LLR = log p(yes) - log p(no) = (z_yes - z_no) / T

Training uses the ordinary SFT loss on the same answer token (see `qlora_jax.pipelines`); this
module holds the pure scoring functions and the tokenizer look-up of the two answer tokens.

`resolve_answer_tokens` finds the token ids from the tokenizer itself: it renders a prompt with
the chat template's generation prompt, appends each answer word and requires the result to be the
prompt's tokens plus exactly one more. The same text is what the training examples contain (the
assistant content is the answer word), so the scored token is the trained token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.errors import UserError

# Spellings tried, in order, for each answer word: as written, capitalised, after a space.
VARIANTS: tuple[Callable[[str], str], ...] = (
    lambda w: w,
    lambda w: w[:1].upper() + w[1:],
    lambda w: " " + w,
    lambda w: " " + w[:1].upper() + w[1:],
)
_TRUE = ("yes", "y", "true", "1", "positive")
_FALSE = ("no", "n", "false", "0", "negative")


class AnswerTokenError(UserError):
    """An answer word is not one token after the assistant prompt of this tokenizer."""


@dataclasses.dataclass(frozen=True)
class AnswerTokens:
    """The two answers as the assistant writes them and as the single tokens they encode to."""

    yes_text: str
    no_text: str
    yes_id: int
    no_id: int

    def text(self, label: bool) -> str:
        return self.yes_text if label else self.no_text


def continuation_ids(encode: Callable[[str], list[int]], prompt_text: str, word: str) -> list[int]:
    """Tokens that ``word`` adds after ``prompt_text``; raises if it changes the prompt's tokens."""
    base = encode(prompt_text)
    full = encode(prompt_text + word)
    if full[: len(base)] != base:
        raise AnswerTokenError(f"appending {word!r} re-tokenizes the end of the prompt")
    return full[len(base):]


def resolve_answer_tokens(
    encode: Callable[[str], list[int]],
    prompt_text: str,
    words: Sequence[str] = ("yes", "no"),
    *,
    tokenizer_name: str = "the tokenizer",
    variants: Sequence[Callable[[str], str]] = VARIANTS,
) -> AnswerTokens:
    """The first spelling (``VARIANTS`` order) in which both words are one token each.

    ``encode``: text -> token ids without added special tokens (the chat template writes its
    own). ``prompt_text``: a prompt rendered with the generation prompt, i.e. exactly the text
    the answer follows in training and scoring. Raises `AnswerTokenError` naming the tokenizer,
    the word and its tokens when no spelling works.
    """
    if len(words) != 2 or words[0] == words[1]:
        raise ValueError(f"need two different answer words, got {list(words)!r}")
    failures = []
    for variant in variants:
        texts = [variant(w) for w in words]
        try:
            ids = [continuation_ids(encode, prompt_text, t) for t in texts]
        except AnswerTokenError as err:
            failures.append(str(err))
            continue
        if all(len(i) == 1 for i in ids) and ids[0][0] != ids[1][0]:
            return AnswerTokens(texts[0], texts[1], int(ids[0][0]), int(ids[1][0]))
        failures += [f"{t!r} -> {len(i)} tokens {i}" for t, i in zip(texts, ids) if len(i) != 1]
    bad = [w for w in words if not _is_one_token(encode, prompt_text, w)] or list(words)
    raise AnswerTokenError(
        f"{tokenizer_name}: the answer {bad[0]!r} is not a single token after the assistant prompt, "
        f"in any spelling tried ({'; '.join(failures)}). The yes/no objective scores one token per "
        "answer: choose other answer words (pipeline.answer_words)."
    )


def _is_one_token(encode: Callable[[str], list[int]], prompt_text: str, word: str) -> bool:
    try:
        return len(continuation_ids(encode, prompt_text, word)) == 1
    except AnswerTokenError:
        return False


def normalize_label(value: Any, *, where: str = "label") -> bool:
    """A yes/no label from "yes"/"no", booleans, 1/0 and similar; raises ValueError otherwise."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{where}: {value!r} is not a yes/no label (expected yes/no, true/false or 1/0)")


def restricted_log_probs(logits: jax.Array, allowed_ids: Sequence[int], temperature: float = 1.0) -> jax.Array:
    """log softmax over ``allowed_ids`` only: ``[..., vocab] -> [..., len(allowed_ids)]`` float32.

    Every other vocabulary entry is set to -inf before the softmax (the seed's masking of the
    final layer), so the returned probabilities sum to one over the allowed tokens.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = logits.astype(jnp.float32) / temperature
    allowed = jnp.zeros(z.shape[-1], bool).at[jnp.asarray(allowed_ids)].set(True)
    masked = jnp.where(allowed, z, -jnp.inf)
    logp = jax.nn.log_softmax(masked, axis=-1)
    return jnp.take(logp, jnp.asarray(allowed_ids), axis=-1)


def yes_no_scores(logits: jax.Array, answers: AnswerTokens, temperature: float = 1.0) -> dict[str, jax.Array]:
    """Scores from the logits at the answer position (``[..., vocab]``), each ``[...]``:

    ``log_p_yes``, ``log_p_no`` (restricted softmax), ``llr`` = log p(yes) - log p(no),
    ``p_yes`` = exp(log_p_yes), ``pred_yes`` = argmax (True on a tie).
    """
    logp = restricted_log_probs(logits, (answers.yes_id, answers.no_id), temperature)
    log_p_yes, log_p_no = logp[..., 0], logp[..., 1]
    return {"log_p_yes": log_p_yes, "log_p_no": log_p_no, "llr": log_p_yes - log_p_no,
            "p_yes": jnp.exp(log_p_yes), "pred_yes": log_p_yes >= log_p_no}


def answer_positions(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """Index of the logits that predict the answer: the last prompt token, ``length - 1``."""
    lengths = np.asarray(lengths)
    if (lengths < 1).any():
        raise ValueError("every prompt needs at least one token")
    return lengths - 1


__all__ = [
    "AnswerTokenError", "AnswerTokens", "VARIANTS", "answer_positions", "continuation_ids",
    "normalize_label", "resolve_answer_tokens", "restricted_log_probs", "yes_no_scores",
]
