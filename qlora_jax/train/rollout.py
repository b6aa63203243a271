"""GRPO's batch source: prompts -> sampled groups -> rewards -> advantages -> a train batch.

One rollout (trl 1.16.0's semantics, ``objectives/grpo.py``): ``batch_size * grad_accum /
num_generations`` prompts, each repeated G times, are completed by the current policy with the
jit-compiled KV-cache sampler (``qlora_jax.inference.generate``). With ``grpo.dense_sampling`` the sampler
reads a dequantized copy of the frozen NF4 base made once at start (the same weights; it skips
re-dequantizing every weight at every decoded token). The completion mask runs up to and including
the stop token. The reward functions (``objectives/rewards.py``) score the decoded completions;
their weighted sum is normalized within each prompt's group into advantages. Reference log-probs
(adapters off, or frozen starting adapters) and, when ``num_iterations > 1``, the old policy's
log-probs are computed once per rollout, outside the differentiated function.

The draws come from ``(seed, step)`` and the prompt order from ``(seed, epoch)``, so a run killed
and resumed from a checkpoint samples what one that was not would have.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.data import DataError, load_rows
from qlora_jax.data.tokenize import encode, render_chat
from qlora_jax.inference.generate import Generator, SamplingParams
from qlora_jax.objectives import grpo as grpo_lib
from qlora_jax.objectives import rewards as rewards_lib
from qlora_jax.quant import dequantize_4bit
from qlora_jax.quant.nf4 import Quant4bit
from qlora_jax.train import sharding as shard_lib


@dataclasses.dataclass
class PromptExample:
    prompt: Any  # as in the dataset: a string or a message list (what reward functions receive)
    prompt_ids: list[int]  # rendered through the chat template, generation header included
    columns: dict[str, Any]  # every other column of the row (e.g. "answer")


def load_prompts(source: str, tokenizer: Any, *, prompt_column: str, system_prompt: str,
                 max_prompt_length: int) -> tuple[list[PromptExample], int]:
    """(prompts, number whose start was cut off to fit ``max_prompt_length``)."""
    rows = load_rows(source)
    if prompt_column not in rows.column_names:
        raise DataError(f"{source}: no {prompt_column!r} column (config.data.prompt_column); columns are "
                        f"{rows.column_names}")
    out, truncated = [], 0
    for i, row in enumerate(rows):
        prompt = row[prompt_column]
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
            messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
        else:
            raise DataError(f"{source} row {i}: {prompt_column!r} must be a string or a message list")
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages
        ids = encode(tokenizer, render_chat(tokenizer, messages, add_generation_prompt=True))
        if len(ids) > max_prompt_length:
            ids, truncated = ids[-max_prompt_length:], truncated + 1
        out.append(PromptExample(prompt, ids, {k: v for k, v in row.items() if k != prompt_column}))
    return out, truncated


class PromptIterator:
    """Prompt indices ``per_step`` at a time, reshuffled every epoch from ``(seed, epoch)``; resumable.

    Its state carries a fingerprint of the prompts (token ids) and settings, as the SFT and DPO
    iterators' do: a run resumed on other prompts or another batch shape stops with one line
    instead of continuing at a position that means something else.
    """

    def __init__(self, n: int, per_step: int, seed: int, prompts: list[PromptExample] | None = None):
        self.n, self.per_step, self.seed = n, per_step, seed
        self.epoch = self.position = 0
        h = hashlib.blake2b(repr((n, per_step, seed)).encode(), digest_size=8)
        for p in prompts or ():
            h.update(np.asarray(p.prompt_ids, np.int64).tobytes())
            h.update(b"|")
        self.fingerprint = h.hexdigest()

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next_indices(self) -> list[int]:
        out = []
        while len(out) < self.per_step:
            take = self._order()[self.position:self.position + self.per_step - len(out)]
            out += [int(i) for i in take]
            self.position += len(take)
            if self.position >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "fingerprint": self.fingerprint}

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") not in (None, self.fingerprint):
            raise ValueError("the saved prompt-iterator state belongs to different prompts or batching settings "
                             f"(fingerprint {state['fingerprint']} != {self.fingerprint})")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# -- sampling and scoring ---------------------------------------------------------------------------


def score_fn(graphdef, mesh, temperature: float):
    repl = shard_lib.replicated(mesh)

    def fn(lora, rest, batch, lora_enabled):
        return grpo_lib.policy_logps(graphdef, lora, rest, batch, lora_enabled=lora_enabled, temperature=temperature)

    return jax.jit(fn, static_argnums=(3,), out_shardings=repl)


def dense_state(rest: Any, dtype: Any) -> Any:
    """The frozen state with every 4-bit weight dequantized (stacked layers stay stacked)."""
    def deq(x):
        if not isinstance(x, Quant4bit):
            return x
        fn = lambda q: dequantize_4bit(q, dtype)  # noqa: E731
        for _ in range(jnp.ndim(x.offset)):  # one vmap per leading (layer) axis
            fn = jax.vmap(fn)
        return fn(x)

    return jax.jit(lambda r: jax.tree.map(deq, r, is_leaf=lambda x: isinstance(x, Quant4bit)))(rest)


class Sampler:
    """The policy's sampler: ``Generator`` on the current adapters and the (optionally dense) frozen base."""

    def __init__(self, graphdef, rest, tokenizer, *, dense: bool, dtype: Any):
        self.graphdef, self.tokenizer = graphdef, tokenizer
        self.rest = dense_state(rest, dtype) if dense else rest

    def generate(self, lora, prompt_ids: list[list[int]], *, max_new_tokens: int, sampling: SamplingParams,
                 batch_rows: int = 0):
        gen = Generator(nnx.merge(self.graphdef, lora, self.rest), self.tokenizer)
        step = batch_rows or len(prompt_ids)
        parts = [gen.generate(prompt_ids[i:i + step], max_new_tokens=max_new_tokens, sampling=sampling)
                 for i in range(0, len(prompt_ids), step)]
        return ([t for p in parts for t in p.tokens], [t for p in parts for t in p.texts],
                [r == "length" for p in parts for r in p.finish_reasons])


@dataclasses.dataclass
class Rollout:
    batch: dict[str, np.ndarray]  # [micro, rows / micro, ...] for the train step
    rewards: np.ndarray  # [rows, functions] (NaN: not scored)
    total: np.ndarray  # [rows] weighted sum
    advantages: grpo_lib.Advantages
    lengths: np.ndarray  # [rows] completion tokens
    truncated: np.ndarray  # [rows] bool: no stop token within max_completion_length
    seconds: float


def rollout_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0] >> 1)


def score_prompts(sampler: Sampler, lora, prompts: list[PromptExample], reward_fns, weights, *, repeat: int,
                  max_new_tokens: int, sampling: SamplingParams, batch_rows: int = 0):
    """Generate ``repeat`` completions per prompt (rows of a prompt adjacent) and score them."""
    rows = [p for p in prompts for _ in range(repeat)]
    tokens, texts, truncated = sampler.generate(lora, [p.prompt_ids for p in rows], max_new_tokens=max_new_tokens,
                                                sampling=sampling, batch_rows=batch_rows)
    columns = {k: [p.columns.get(k) for p in rows] for k in rows[0].columns}
    columns["completion_ids"] = tokens
    rewards = rewards_lib.compute_rewards(reward_fns, [p.prompt for p in rows], texts, columns)
    return rows, tokens, texts, np.asarray(truncated), rewards
