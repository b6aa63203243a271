"""Training objectives: pure functions of (hidden states or logits, batch).

The vocabulary projection is the largest activation of a small-model step ([batch, seq, vocab]
float32 logits: 4 x 256 x 49152 x 4 B = 201 MB for SmolLM2), so the SFT loss takes the final
hidden states and the head weight and works through the tokens in chunks, recomputing each
chunk's logits in the backward pass instead of keeping them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunk_nll(h: jax.Array, w: jax.Array, t: jax.Array) -> jax.Array:
    """-log softmax(h @ w.T)[t] for one chunk. h [c, d], w [v, d], t [c] -> [c] float32."""
    logits = jnp.einsum("cd,vd->cv", h, w, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    return lse - picked


def token_nll(
    hidden: jax.Array,
    head_weight: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int = 512,
) -> jax.Array:
    """Per-token negative log-likelihood, float32 [batch, seq].

    hidden:      [batch, seq, d] final (normed) hidden states.
    head_weight: [vocab, d] the lm_head (or tied embedding) weight.
    targets:     [batch, seq] int next-token ids (any value where the loss is masked).
    The full [batch, seq, vocab] logits never exist: ``chunk_size`` tokens at a time, with the
    chunk's logits recomputed in the backward pass.
    """
    b, s, d = hidden.shape
    n = b * s
    chunk = min(chunk_size, n)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0))).reshape(n_chunks, chunk, d)
    t = jnp.pad(targets.reshape(n), (0, pad)).reshape(n_chunks, chunk)
    body = jax.checkpoint(_chunk_nll, prevent_cse=False)
    nll = jax.lax.map(lambda ht: body(ht[0], head_weight, ht[1]), (h, t))
    return nll.reshape(-1)[:n].reshape(b, s)


def masked_nll_sum(
    hidden: jax.Array,
    head_weight: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
    *,
    chunk_size: int = 512,
) -> tuple[jax.Array, jax.Array]:
    """(sum of NLL over masked tokens, number of masked tokens), both float32 scalars.

    Returning the sum and the count, not the mean, lets gradient accumulation weight every token
    equally across micro-batches: loss = sum_i nll_i / sum_i count_i.
    """
    nll = token_nll(hidden, head_weight, targets, chunk_size=chunk_size)
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def sequence_logprob(
    hidden: jax.Array,
    head_weight: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
    *,
    chunk_size: int = 512,
) -> jax.Array:
    """Sum over masked positions of log p(target), per sequence: [batch] float32 (for DPO).

    Only masked positions need the vocabulary projection (in preference data the prompt, which is
    most of a sequence, carries no loss). Positions are reordered masked-first, cut into chunks, and
    a chunk without a masked position skips its projection (``lax.cond``), in the forward and the
    backward pass; shapes stay static, so no recompilation per batch.
    """
    hidden, targets, loss_mask = jnp.asarray(hidden), jnp.asarray(targets), jnp.asarray(loss_mask)
    b, s, d = hidden.shape
    n = b * s
    chunk = min(chunk_size, n)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    live = loss_mask.reshape(n) > 0
    order = jnp.argsort(jnp.logical_not(live), stable=True)  # masked positions first, else in order
    h = jnp.pad(hidden.reshape(n, d)[order], ((0, pad), (0, 0))).reshape(n_chunks, chunk, d)
    t = jnp.pad(targets.reshape(n)[order], (0, pad)).reshape(n_chunks, chunk)
    m = jnp.pad(live[order], (0, pad)).reshape(n_chunks, chunk)
    body = jax.checkpoint(_chunk_nll, prevent_cse=False)

    def one(args):
        hc, tc, mc = args
        return jax.lax.cond(jnp.any(mc), lambda: body(hc, head_weight, tc) * mc, lambda: jnp.zeros(chunk, jnp.float32))

    nll = jax.lax.map(one, (h, t, m)).reshape(-1)[:n]
    return -jax.ops.segment_sum(nll, order // s, num_segments=b)
