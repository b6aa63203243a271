"""Text generation with a KV cache: a jitted prefill and a jitted decode loop, batched and streamed.

    python -m qlora_jax.generate [--model smollm2-135m-instruct] [--adapter RUN_DIR/adapter]
        --prompt "..." [--prompt "..."] [--system "..."] [--raw] [--max-new-tokens 128]
        [--temperature 0] [--top-k 0] [--top-p 1] [--seed 0] [--quantize nf4|none] [--stream]

How it runs (``Generator``):

* **Prefill**: the prompts are left-padded to a common *bucket* length (the next power of two,
  at least 16), written into an empty :class:`~qlora_jax.models.KVCache` in one forward pass, and
  the first token is chosen from the last position's logits.
* **Decode**: a ``lax.while_loop`` feeds each row its last token, writes one cache slot per step
  and chooses the next token, until ``max_new_tokens`` or until every row has produced a stop
  token. Finished rows keep running (batched) but record the pad id and stop counting.
* Shapes are static: the cache holds ``bucket + new_cap`` slots, where ``new_cap`` is
  ``max_new_tokens`` rounded up to a multiple of 32, and the loop's bound is a traced number, so
  one compiled prefill / decode pair serves every prompt length within a bucket and every
  ``max_new_tokens`` within a multiple of 32. Compiled programs are keyed by (model structure,
  batch size, bucket, new_cap, adapters on/off, greedy/sampling); temperature, top-k, top-p,
  seed and stop tokens are traced values and never recompile.
* **Streaming** (:meth:`Generator.stream`) calls the *same* compiled decode loop with a bound of
  ``chunk`` steps at a time and yields the new tokens (and text) between calls; the cache and
  the rest of the loop state are donated, so each call updates them in place.

Token choice follows transformers' order: logits / temperature, then top-k, then top-p (the
smallest set of most likely tokens whose probability reaches ``top_p``, computed on the top-k
survivors), then a categorical draw; ``temperature=0`` is greedy (argmax, ties to the lowest id).
Stop tokens default to the tokenizer's eos plus the chat end-of-turn tokens it knows
(``<|im_end|>``, ``<|eot_id|>``, ...); the stop token is part of the returned ids, not of the text.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.checkpoints.load import load_model
from qlora_jax.checkpoints.run_dir import load_run_model, read_run
from qlora_jax.data.batching import round_up
from qlora_jax.data.tokenize import pad_id_of
from qlora_jax.errors import UserError
from qlora_jax.models import KVCache

# Tokens that end a turn in the chat templates of the families we load (and common eos spellings).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>", "</s>")
MIN_BUCKET = 16  # shortest prompt bucket
NEW_TOKENS_MULTIPLE = 32  # max_new_tokens is rounded up to this for the compiled buffer sizes


def bucket_length(n: int, minimum: int = MIN_BUCKET) -> int:
    """The padded prompt length: the next power of two >= ``n`` (at least ``minimum``)."""
    if n < 1:
        raise ValueError("empty prompt: a prompt needs at least one token")
    return max(minimum, 1 << (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. ``temperature=0``: greedy; then top-k and top-p are unused."""

    temperature: float = 0.0  # logits are divided by it; 0 = greedy argmax
    top_k: int = 0  # keep the k most likely tokens (ties at the k-th kept); 0 = off
    top_p: float = 1.0  # keep the smallest most-likely set with total probability >= top_p; 1 = off
    seed: int = 0  # PRNG seed of the draws

    def __post_init__(self):
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be >= 0 and finite, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# ---------------------------------------------------------------------------------------------
# Token choice (pure functions of logits)

def sampling_mask(logits: jax.Array, top_k: jax.Array | int, top_p: jax.Array | float) -> jax.Array:
    """Boolean ``[..., vocab]``: the tokens top-k and then top-p allow, for (temperature-scaled)
    float32 ``logits [..., vocab]``.

    top-k keeps every token at least as likely as the k-th most likely (``top_k=0``: all).
    top-p then keeps, among those, the most likely tokens until their renormalized probability
    reaches ``top_p`` (the token that crosses it included; ``top_p=1``: all). Ties at either
    threshold are kept. Both are traced values: changing them never recompiles.
    """
    vocab = logits.shape[-1]
    top_k = jnp.asarray(top_k, jnp.int32)
    top_p = jnp.asarray(top_p, jnp.float32)
    ordered = -jnp.sort(-logits, axis=-1)  # descending
    kth = jnp.take(ordered, jnp.clip(top_k, 1, vocab) - 1, axis=-1)[..., None]
    keep_k = jnp.where(top_k > 0, logits >= kth, True)
    ordered = jnp.where((top_k > 0) & (ordered < kth), -jnp.inf, ordered)  # the survivors, still sorted
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly more likely ones
    cutoff = jnp.min(jnp.where(mass_before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
    keep_p = jnp.where(top_p < 1.0, logits >= cutoff, True)
    return keep_k & keep_p


def choose_tokens(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array, *, greedy: bool) -> jax.Array:
    """Next token ids ``[batch]`` from float32 ``logits [batch, vocab]``."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.asarray(temperature, jnp.float32)
    allowed = sampling_mask(scaled, top_k, top_p)
    return jax.random.categorical(key, jnp.where(allowed, scaled, -jnp.inf), axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# The compiled prefill and decode loop

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Knobs:
    """Traced settings of one generation call (changing them does not recompile)."""

    temperature: jax.Array  # [] float32
    top_k: jax.Array  # [] int32
    top_p: jax.Array  # [] float32
    stop_ids: jax.Array  # [n_stop] int32 (padded with -1)
    pad_id: jax.Array  # [] int32: recorded after a row has finished
    max_new: jax.Array  # [] int32: tokens to generate at most (<= the buffer's new_cap)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything the decode loop carries; returned to Python between streamed chunks."""

    cache: KVCache
    tokens: jax.Array  # [batch, new_cap] int32: generated ids (pad after a row's stop token)
    lengths: jax.Array  # [batch] int32: generated tokens per row, its stop token included
    finished: jax.Array  # [batch] bool: the row produced a stop token
    step: jax.Array  # [] int32: decode positions done (columns of ``tokens`` filled)
    key: jax.Array  # PRNG key; step ``i`` draws with ``fold_in(key, i)``


def _record(ds: DecodeState, cache: KVCache, token: jax.Array, knobs: Knobs) -> DecodeState:
    token = jnp.where(ds.finished, knobs.pad_id, token)
    tokens = jax.lax.dynamic_update_slice(ds.tokens, token[:, None], (jnp.zeros((), jnp.int32), ds.step))
    lengths = ds.lengths + (~ds.finished).astype(jnp.int32)
    finished = ds.finished | jnp.isin(token, knobs.stop_ids)
    return DecodeState(cache=cache, tokens=tokens, lengths=lengths, finished=finished, step=ds.step + 1,
                       key=ds.key)


def _next_token(model, hidden_last: jax.Array, ds: DecodeState, knobs: Knobs, greedy: bool) -> jax.Array:
    logits = model.logits_from_hidden(hidden_last).astype(jnp.float32)  # [batch, vocab]
    return choose_tokens(logits, jax.random.fold_in(ds.key, ds.step), knobs.temperature, knobs.top_k,
                         knobs.top_p, greedy=greedy)


@functools.partial(jax.jit, static_argnames=("graphdef", "new_cap", "use_lora", "greedy"))
def prefill(graphdef, state, prompt_ids: jax.Array, start: jax.Array, key: jax.Array, knobs: Knobs, *,
            new_cap: int, use_lora: bool, greedy: bool) -> DecodeState:
    """Run left-padded ``prompt_ids [batch, bucket]`` (row ``b``'s real tokens from ``start[b]``)
    into a fresh cache of ``bucket + new_cap`` slots and choose each row's first new token."""
    model = nnx.merge(graphdef, state)
    batch, bucket = prompt_ids.shape
    cache = model.init_cache(batch, bucket + new_cap, start=start)
    hidden, cache = model.decode(prompt_ids, cache, lora_enabled=use_lora)
    ds = DecodeState(cache=cache, tokens=jnp.full((batch, new_cap), knobs.pad_id, jnp.int32),
                     lengths=jnp.zeros((batch,), jnp.int32), finished=jnp.zeros((batch,), bool),
                     step=jnp.zeros((), jnp.int32), key=key)
    return _record(ds, cache, _next_token(model, hidden[:, -1], ds, knobs, greedy), knobs)


@functools.partial(jax.jit, static_argnames=("graphdef", "use_lora", "greedy"), donate_argnames=("ds",))
def decode_steps(graphdef, state, ds: DecodeState, knobs: Knobs, num_steps: jax.Array, *,
                 use_lora: bool, greedy: bool) -> DecodeState:
    """Up to ``num_steps`` (traced) decode steps; stops early at ``knobs.max_new`` tokens or when
    every row has finished. The one compiled loop behind both ``generate`` and ``stream``."""
    model = nnx.merge(graphdef, state)
    stop_at = jnp.minimum(ds.step + num_steps, knobs.max_new)

    def cond(ds):
        return (ds.step < stop_at) & ~jnp.all(ds.finished)

    def body(ds):
        last = jax.lax.dynamic_slice_in_dim(ds.tokens, ds.step - 1, 1, axis=1)  # [batch, 1]
        hidden, cache = model.decode(last, ds.cache, lora_enabled=use_lora)
        return _record(ds, cache, _next_token(model, hidden[:, -1], ds, knobs, greedy), knobs)

    return jax.lax.while_loop(cond, body, ds)


# ---------------------------------------------------------------------------------------------
# The Python-facing generator

@dataclasses.dataclass
class Generation:
    """Result of :meth:`Generator.generate` (one entry per prompt)."""

    tokens: list[list[int]]  # generated ids, the stop token included when one was produced
    texts: list[str]  # decoded generated ids without the stop token ("" without a tokenizer)
    finish_reasons: list[str]  # "stop" (a stop token) or "length" (max_new_tokens reached)
    prompt_lengths: list[int]
    seconds: float = 0.0  # wall time of prefill + decode (compilation included on a first call)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


@dataclasses.dataclass
class StreamChunk:
    """What one streamed decode chunk added (one entry per prompt)."""

    tokens: list[list[int]]  # ids new in this chunk (stop token included, nothing after it)
    texts: list[str]  # text new in this chunk (held back while it ends in a partial character)
    finished: list[bool]  # the row is done (stop token or length)


def default_stop_token_ids(tokenizer) -> list[int]:
    """The tokenizer's eos id(s) plus every known end-of-turn token its vocabulary has."""
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    ids.extend(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    vocab = tokenizer.get_vocab()
    ids.extend(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return sorted(set(int(i) for i in ids))


class Generator:
    """Batched generation for a :class:`~qlora_jax.models.CausalLM` (NF4 or not, LoRA or not).

    ``stop_token_ids``: ids that end a row (default :func:`default_stop_token_ids`);
    ``pad_token_id``: left padding and filler after a row stops (default the tokenizer's pad,
    else its eos, else 0). The model's weights are read at every call, so adapters loaded or
    trained after construction are used.
    """

    def __init__(self, model, tokenizer=None, *, stop_token_ids: Sequence[int] | None = None,
                 pad_token_id: int | None = None, min_bucket: int = MIN_BUCKET,
                 new_tokens_multiple: int = NEW_TOKENS_MULTIPLE):
        self.model = model
        self.tokenizer = tokenizer
        if stop_token_ids is None:
            stop_token_ids = default_stop_token_ids(tokenizer) if tokenizer is not None else []
        self.stop_token_ids = [int(i) for i in stop_token_ids]
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = pad_id_of(tokenizer)
        self.pad_token_id = int(pad_token_id or 0)
        self.min_bucket = min_bucket
        self.new_tokens_multiple = new_tokens_multiple

    # -- inputs ---------------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a raw prompt (a string is tokenized as is, no chat template)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("string prompts need a tokenizer; pass token ids instead")
            return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return [int(t) for t in prompt]

    def chat_prompt(self, messages: str | Sequence[dict[str, str]], system: str | None = None) -> list[int]:
        """Token ids of a chat (a user message string or a message list) through the chat template,
        ending with the assistant turn's header."""
        if self.tokenizer is None:
            raise ValueError("chat prompts need a tokenizer")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        messages = list(messages)
        if system is not None:
            messages = [{"role": "system", "content": system}] + messages
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                 return_dict=False)
        return [int(t) for t in ids]

    def _knobs(self, sampling: SamplingParams, max_new_tokens: int) -> Knobs:
        stop = self.stop_token_ids or [-1]
        stop = stop + [-1] * (round_up(len(stop), 8) - len(stop))  # a few sizes, not one per list
        return Knobs(temperature=jnp.float32(sampling.temperature or 1.0), top_k=jnp.int32(sampling.top_k),
                     top_p=jnp.float32(sampling.top_p), stop_ids=jnp.asarray(stop, jnp.int32),
                     pad_id=jnp.int32(self.pad_token_id), max_new=jnp.int32(max_new_tokens))

    def _start(self, prompts, max_new_tokens: int, sampling: SamplingParams, lora_enabled: bool):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = [self.encode(p) for p in prompts]
        if not ids:
            raise ValueError("no prompts")
        bucket = bucket_length(max(len(p) for p in ids), self.min_bucket)
        new_cap = round_up(max_new_tokens, self.new_tokens_multiple)
        limit = self.model.config.max_position_embeddings
        if max(len(p) for p in ids) + max_new_tokens > limit:
            raise ValueError(f"prompt ({max(len(p) for p in ids)} tokens) + max_new_tokens ({max_new_tokens}) "
                             f"exceeds the model's max_position_embeddings ({limit})")
        padded = np.full((len(ids), bucket), self.pad_token_id, np.int32)
        start = np.zeros((len(ids),), np.int32)
        for row, p in enumerate(ids):
            padded[row, bucket - len(p):] = p
            start[row] = bucket - len(p)
        graphdef, state = nnx.split(self.model)
        use_lora = bool(lora_enabled) and self.model.lora_config is not None
        knobs = self._knobs(sampling, max_new_tokens)
        statics = dict(use_lora=use_lora, greedy=sampling.greedy)
        ds = prefill(graphdef, state, jnp.asarray(padded), jnp.asarray(start), jax.random.key(sampling.seed),
                     knobs, new_cap=new_cap, **statics)
        step = functools.partial(decode_steps, graphdef, state, knobs=knobs, **statics)
        return ids, ds, step

    # -- outputs --------------------------------------------------------------------------------
    def _text(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        if ids and ids[-1] in self.stop_token_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def generate(self, prompts: Sequence[str | Sequence[int]], *, max_new_tokens: int = 128,
                 sampling: SamplingParams | None = None, lora_enabled: bool = True) -> Generation:
        """Complete each prompt (raw text or token ids; see :meth:`chat_prompt` for chats)."""
        sampling = sampling or SamplingParams()
        t0 = time.perf_counter()
        ids, ds, step = self._start(prompts, max_new_tokens, sampling, lora_enabled)
        ds = step(ds, num_steps=jnp.int32(max_new_tokens))
        tokens, lengths, finished = jax.device_get((ds.tokens, ds.lengths, ds.finished))
        seconds = time.perf_counter() - t0
        out = [[int(t) for t in tokens[r, :lengths[r]]] for r in range(len(ids))]
        return Generation(tokens=out, texts=[self._text(t) for t in out],
                          finish_reasons=["stop" if f else "length" for f in finished],
                          prompt_lengths=[len(p) for p in ids], seconds=seconds)

    def stream(self, prompts: Sequence[str | Sequence[int]], *, max_new_tokens: int = 128,
               sampling: SamplingParams | None = None, lora_enabled: bool = True,
               chunk: int = 1) -> Iterator[StreamChunk]:
        """Yield the tokens (and text) each ``chunk`` decode steps add, until all rows are done.

        The first chunk holds the prefill's token. Concatenating every chunk's ``tokens`` gives
        exactly :meth:`generate`'s ids (same compiled functions, same draws).
        """
        sampling = sampling or SamplingParams()
        ids, ds, step = self._start(prompts, max_new_tokens, sampling, lora_enabled)
        batch = len(ids)
        emitted = [0] * batch  # tokens already yielded per row
        texts = [""] * batch  # text already yielded per row
        while True:
            tokens, lengths, finished, done = jax.device_get((ds.tokens, ds.lengths, ds.finished, ds.step))
            done_all = bool(finished.all()) or int(done) >= max_new_tokens
            new_tokens, new_texts = [], []
            for r in range(batch):
                row = [int(t) for t in tokens[r, :lengths[r]]]
                new_tokens.append(row[emitted[r]:])
                emitted[r] = len(row)
                text = self._text(row)
                if text.endswith("\ufffd") and not (finished[r] or done_all):
                    text = texts[r]  # a multi-byte character is still incomplete
                new_texts.append(text[len(texts[r]):] if text.startswith(texts[r]) else text)
                texts[r] = text
            yield StreamChunk(tokens=new_tokens, texts=new_texts,
                              finished=[bool(f) or done_all for f in finished])
            if done_all:
                return
            ds = step(ds, num_steps=jnp.int32(chunk))


# ---------------------------------------------------------------------------------------------
# Loading a model (optionally with a run's adapters) for inference

def check_adapter_path(adapter: str | Path, flag: str = "--adapter") -> Path:
    """``adapter`` must be a PEFT adapter directory or a run directory; else a :class:`UserError`
    naming ``flag`` (the option or config key the path came from)."""
    adapter = Path(adapter)
    if not adapter.exists():
        raise UserError(f"{flag}={adapter}: no such directory (expected RUN_DIR/adapter or a run directory)")
    if not adapter.is_dir():
        raise UserError(f"{flag}={adapter}: is a file; expected a PEFT adapter directory (RUN_DIR/adapter) "
                        f"or a run directory")
    if not ((adapter / "adapter_config.json").is_file() or (adapter / "adapter").is_dir()
            or (adapter / "checkpoints").is_dir()):
        raise UserError(f"{flag}={adapter}: neither a PEFT adapter directory (no adapter_config.json) nor a "
                        f"run directory (no adapter/ or checkpoints/)")
    return adapter


def load_for_inference(model: str | None = None, adapter: str | Path | None = None, *,
                       quantize: str | None = "default", dtype: str = "float32", adapter_flag: str = "--adapter"):
    """``(model, tokenizer, description)`` for generation or evaluation.

    ``adapter``: a PEFT adapter directory (``RUN_DIR/adapter``) or a run directory; the LoRA
    config comes from ``adapter_config.json`` (or the run's checkpoint record), and the base
    model and its quantization default to what the run recorded. Without an adapter the model
    (default ``smollm2-135m-instruct``) is loaded without LoRA. ``quantize``: "nf4" | "fp4" |
    "none"; "default" means the run's choice, else "nf4". A missing or unusable ``adapter`` raises
    :class:`UserError` naming ``adapter_flag``.
    """
    explicit_quant = None if quantize == "default" else quantize
    if adapter is None:
        source = model or "smollm2-135m-instruct"
        q = "nf4" if explicit_quant is None else explicit_quant
        q = None if q in ("none", "") else q
        m, tok = load_model(source, quantize=q, dtype=dtype)
        return m, tok, f"{source} (quantize={q or 'none'})"
    adapter = check_adapter_path(adapter, adapter_flag)
    if (adapter / "adapter_config.json").is_file():
        run = read_run(adapter.parent, source=model, adapter=adapter, quantize=explicit_quant)
    else:
        run = read_run(adapter, source=model, quantize=explicit_quant)
    m, tok = load_run_model(run, dtype=dtype, param_dtype=None)
    where = run.adapter_dir or run.checkpoint
    return m, tok, f"{run.source} (quantize={run.quantize or 'none'}) + adapters from {where}"
