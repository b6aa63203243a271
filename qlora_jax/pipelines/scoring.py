"""Score prompts with the yes/no objective: one base model per process, adapters swapped per job.

Prompts are rendered exactly as the trainer renders a training example's prompt (the chat
template with the generation prompt, no added special tokens), so the logits at the last prompt
token are the ones the answer token was trained against.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.checkpoints.load import load_model
from qlora_jax.checkpoints.run_dir import abstract_like, init_adapters_from
from qlora_jax.data import render_chat
from qlora_jax.data.batching import round_up
from qlora_jax.data.tokenize import encode, pad_id_of
from qlora_jax.lora import split_model
from qlora_jax.objectives.yesno import AnswerTokens, answer_positions, yes_no_scores
from qlora_jax.pipelines.plan import messages

log = logging.getLogger(__name__)


def prompt_text(tokenizer: Any, prompt: str, system_prompt: str = "") -> str:
    """A prompt rendered with the chat template up to and including the assistant's generation prompt."""
    return render_chat(tokenizer, messages(prompt, system_prompt), add_generation_prompt=True)


def prompt_ids(tokenizer: Any, prompt: str, system_prompt: str = "") -> list[int]:
    """Token ids of ``prompt_text`` (the template writes its own special tokens)."""
    return encode(tokenizer, prompt_text(tokenizer, prompt, system_prompt))


def answer_logits_fn(graphdef):
    """jit'd (adapters, frozen state, input_ids, segment_ids, positions, last) -> logits [b, vocab]
    at index ``last`` of each row: the position that predicts the answer token."""

    @jax.jit
    def fn(lora, rest, input_ids, segment_ids, positions, last):
        model = nnx.merge(graphdef, lora, rest)
        h = model.hidden_states(input_ids, positions=positions, segment_ids=segment_ids)  # [b, s, d]
        h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]  # [b, d]
        return model.logits_from_hidden(h_last).astype(jnp.float32)

    return fn


def score_ids(
    logits_fn, lora: Any, rest: Any, ids: Sequence[Sequence[int]], answers: AnswerTokens, *,
    batch_size: int = 16, pad_id: int = 0, pad_to_multiple_of: int = 16, temperature: float = 1.0,
) -> dict[str, np.ndarray]:
    """Yes/no scores of every prompt (``yesno.yes_no_scores`` keys, each ``[len(ids)]``).

    Prompts are sorted by length and right-padded (``segment_ids`` 0 on padding) to a multiple of
    ``pad_to_multiple_of``; a short last batch is filled with copies of its first row, so only a
    few shapes are compiled. Results come back in the input order.
    """
    lengths = np.array([len(x) for x in ids])
    last_index = answer_positions(lengths)
    order = np.argsort(lengths, kind="stable")
    out: dict[str, np.ndarray] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        rows = np.concatenate([rows, np.repeat(rows[:1], batch_size - rows.size)])
        width = round_up(int(lengths[rows].max()), pad_to_multiple_of)
        input_ids = np.full((batch_size, width), pad_id, np.int32)
        segment_ids = np.zeros((batch_size, width), np.int32)
        positions = np.zeros((batch_size, width), np.int32)
        for r, i in enumerate(rows):
            n = lengths[i]
            input_ids[r, :n] = ids[i]
            segment_ids[r, :n] = 1
            positions[r, :n] = np.arange(n)
        logits = logits_fn(lora, rest, input_ids, segment_ids, positions, last_index[rows].astype(np.int32))
        scores = jax.device_get(yes_no_scores(logits, answers, temperature))
        n_real = min(batch_size, len(order) - start)
        for k, v in scores.items():
            out.setdefault(k, np.empty(len(ids), np.asarray(v).dtype))[order[start:start + n_real]] = v[:n_real]
    return out


class Scorer:
    """The base model loaded once; ``use_adapters(job_dir)`` restores a job's newest adapters."""

    def __init__(self, cfg, lora_config, record: dict[str, Any]):
        quantize = None if cfg.model.quantize in ("none", "") else cfg.model.quantize
        model, self.tokenizer = load_model(
            cfg.model.source, quantize=quantize, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
            lora=lora_config, blocksize=cfg.model.blocksize, double_quant=cfg.model.double_quant)
        self.graphdef, self.lora, self.rest = split_model(model)
        self.record = record
        self.logits_fn = answer_logits_fn(self.graphdef)
        self.pad_id = pad_id_of(self.tokenizer)
        self.source = None

    def use_adapters(self, job_dir: Path) -> str:
        """Restore the adapters of a trainer workdir's newest checkpoint (LoRA record checked)."""
        self.lora, where = init_adapters_from(job_dir, abstract_like(self.lora), self.record)
        self.source = where
        return where

    def score(self, prompts: Sequence[str], answers: AnswerTokens, *, system_prompt: str = "",
              batch_size: int = 16, temperature: float = 1.0) -> dict[str, np.ndarray]:
        ids = [prompt_ids(self.tokenizer, p, system_prompt) for p in prompts]
        return score_ids(self.logits_fn, self.lora, self.rest, ids, answers, batch_size=batch_size,
                         pad_id=self.pad_id, temperature=temperature)
