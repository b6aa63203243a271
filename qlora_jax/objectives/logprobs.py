"""Training objectives: pure functions of (hidden states or logits, batch).

The vocabulary projection is the largest activation of a small-model step ([batch, seq, vocab]
float32 logits: 4 x 256 x 49152 x 4 B = 201 MB for SmolLM2), so the losses take the final
hidden states and the head weight and work through the tokens in chunks. Each chunk's gradient
with respect to the hidden states is formed in the forward pass (a fused linear cross-entropy),
so logits are neither kept for, nor recomputed in, the backward pass; chunks holding no loss
position are skipped.

``logit_soft_cap`` (gemma2's ``final_logit_softcapping``): the logits are ``cap * tanh(z / cap)``
of the projection ``z``, as ``CausalLM.logits_from_hidden`` computes them; pass
``model.config.final_logit_softcap``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _capped(z: jax.Array, cap: float | None) -> jax.Array:
    return z if cap is None else cap * jnp.tanh(z / cap)


def _chunk_nll(h: jax.Array, w: jax.Array, t: jax.Array, cap: float | None = None) -> jax.Array:
    """-log softmax(h @ w.T)[t] for one chunk. h [c, d], w [v, d], t [c] -> [c] float32."""
    logits = _capped(jnp.einsum("cd,vd->cv", h, w, preferred_element_type=jnp.float32), cap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    return lse - picked


def _chunk_nll_and_grad(h: jax.Array, w: jax.Array, t: jax.Array,
                        cap: float | None = None) -> tuple[jax.Array, jax.Array]:
    """``(nll [c], d nll / d h [c, d])`` for one chunk: the gradient is ``(softmax - onehot(t)) @ w``
    (times the soft cap's derivative ``1 - tanh^2`` when capped)."""
    logits = _capped(jnp.einsum("cd,vd->cv", h, w, preferred_element_type=jnp.float32), cap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    p = jnp.exp(logits - lse[:, None])
    p = p - jax.nn.one_hot(t, p.shape[-1], dtype=p.dtype)
    if cap is not None:
        p = p * (1.0 - jnp.square(logits / cap))
    dh = jnp.einsum("cv,vd->cd", p.astype(w.dtype), w, preferred_element_type=jnp.float32)
    return lse - picked, dh.astype(h.dtype)


def _map_chunks(h, w, t, live, with_grad: bool, cap: float | None = None):
    """Per-chunk NLL (and its gradient) over ``[n_chunks, c, ...]``; a chunk with no live position
    skips its vocabulary projection (``lax.cond``)."""
    c, d = h.shape[1], h.shape[2]

    def one(args):
        hc, tc, lc = args
        if with_grad:
            skip = lambda: (jnp.zeros(c, jnp.float32), jnp.zeros((c, d), h.dtype))  # noqa: E731
            return jax.lax.cond(jnp.any(lc), lambda: _chunk_nll_and_grad(hc, w, tc, cap), skip)
        return jax.lax.cond(jnp.any(lc), lambda: _chunk_nll(hc, w, tc, cap), lambda: jnp.zeros(c, jnp.float32))

    return jax.lax.map(one, (h, t, live))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_nll(h: jax.Array, w: jax.Array, t: jax.Array, live: jax.Array, cap: float | None) -> jax.Array:
    return _map_chunks(h, w, t, live, with_grad=False, cap=cap)


def _chunked_nll_fwd(h, w, t, live, cap):
    return _map_chunks(h, w, t, live, with_grad=True, cap=cap)  # (nll, residual dh)


def _chunked_nll_bwd(cap, dh, g):
    # d loss / d h = g * (softmax - onehot) @ w, with the second factor computed in the forward
    # pass. The head weight is frozen (tied embedding or lm_head): no gradient for it.
    return (g[..., None].astype(dh.dtype) * dh, None, None, None)


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)


def _ordered_nll(hidden, head_weight, targets, loss_mask, chunk_size, cap=None):
    """Per-token NLL ``[batch, seq]`` float32, zero where ``loss_mask`` is 0 (all live if None).

    Live positions are gathered first (a stable argsort), cut into chunks of ``chunk_size``, and
    chunks without a live position skip the vocabulary projection, so a batch whose loss covers
    only completions pays for the completion tokens only. Shapes stay static (no recompilation
    per batch). Under differentiation each chunk computes its gradient ``(softmax - onehot) @ W``
    in the forward pass: the ``[chunk, vocab]`` logits are never kept and never recomputed, and
    the backward pass is one scaling of the saved ``[tokens, d]`` gradient.
    """
    hidden, targets = jnp.asarray(hidden), jnp.asarray(targets)
    b, s, d = hidden.shape
    n = b * s
    chunk = min(chunk_size, n)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    h = hidden.reshape(n, d)
    t = targets.reshape(n)
    if loss_mask is None:
        live = jnp.ones((n,), bool)
        order = None
    else:
        live = jnp.asarray(loss_mask).reshape(n) > 0
        order = jnp.argsort(jnp.logical_not(live), stable=True)  # live positions first, else in order
        h, t, live = h[order], t[order], live[order]
    h = jnp.pad(h, ((0, pad), (0, 0))).reshape(n_chunks, chunk, d)
    t = jnp.pad(t, (0, pad)).reshape(n_chunks, chunk)
    live = jnp.pad(live, (0, pad)).reshape(n_chunks, chunk)
    nll = (_chunked_nll(h, head_weight, t, live, cap) * live).reshape(-1)[:n]
    if order is not None:
        nll = jnp.zeros_like(nll).at[order].set(nll)
    return nll.reshape(b, s)


def token_nll(
    hidden: jax.Array,
    head_weight: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array | None = None,
    *,
    chunk_size: int = 512,
    logit_soft_cap: float | None = None,
) -> jax.Array:
    """Per-token negative log-likelihood, float32 [batch, seq].

    hidden:      [batch, seq, d] final (normed) hidden states.
    head_weight: [vocab, d] the lm_head (or tied embedding) weight (frozen: no gradient).
    targets:     [batch, seq] int next-token ids (any value where the loss is masked).
    loss_mask:   optional [batch, seq]; where it is 0 the result is 0 and no projection is done
                 for a chunk made only of such positions.
    The full [batch, seq, vocab] logits never exist: ``chunk_size`` tokens at a time.
    """
    return _ordered_nll(hidden, head_weight, targets, loss_mask, chunk_size, logit_soft_cap)


def masked_nll_sum(
    hidden: jax.Array,
    head_weight: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
    *,
    chunk_size: int = 512,
    logit_soft_cap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(sum of NLL over masked tokens, number of masked tokens), both float32 scalars.

    Returning the sum and the count, not the mean, lets gradient accumulation weight every token
    equally across micro-batches: loss = sum_i nll_i / sum_i count_i.
    """
    mask = jnp.asarray(loss_mask).astype(jnp.float32)
    nll = _ordered_nll(hidden, head_weight, targets, mask, chunk_size, logit_soft_cap)
    return jnp.sum(nll * mask), jnp.sum(mask)


def sequence_logprob(
    hidden: jax.Array,
    head_weight: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
    *,
    chunk_size: int = 512,
    logit_soft_cap: float | None = None,
) -> jax.Array:
    """Sum over masked positions of log p(target), per sequence: [batch] float32 (for DPO).

    Only masked positions pay for the vocabulary projection (in preference data the prompt, which
    is most of a sequence, carries no loss).
    """
    mask = jnp.asarray(loss_mask).astype(jnp.float32)
    return -jnp.sum(_ordered_nll(hidden, head_weight, targets, mask, chunk_size, logit_soft_cap) * mask, axis=-1)
