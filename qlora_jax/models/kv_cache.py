"""The key/value cache of incremental decoding, as an explicit pytree.

Layout: ``k`` and ``v`` are ``[layers, batch, max_len, kv_heads, head_dim]`` -- one stacked array
per kind, so the decoder's layer scan carries the whole cache and writes each layer's new
entries in place (``dynamic_update_slice`` on a loop carry), and a layer's slab
``[batch, max_len, kv_heads, head_dim]`` is already in the ``[b, s, heads, d]`` layout attention
takes.

Batches of prompts of different lengths are **left-padded**: every row writes the same slot at
every step (one shared ``index``), and ``start[b]`` is the first slot holding a real token of row
``b``. A token in slot ``j`` of row ``b`` sits at rotary position ``j - start[b]``, so a
left-padded row computes exactly what the same prompt alone would (transformers' left-padded
``generate`` does the same with ``attention_mask.cumsum(-1) - 1``). Slots before ``start[b]``
hold padding, which real tokens never attend to; a padding query attends only to itself, so no
softmax row is empty.

The cache is never hidden inside the module: :meth:`CausalLM.decode` takes one and returns the
updated one, and jitted decode loops carry it (and can donate it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from qlora_jax.models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for the slots written so far (see module docstring)."""

    k: jax.Array  # [layers, batch, max_len, kv_heads, head_dim], rotary already applied
    v: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
    start: jax.Array  # [batch] int32: first slot of each row's real tokens (its left padding)
    index: jax.Array  # [] int32: next slot to write, shared by all rows

    @classmethod
    def create(cls, config: ModelConfig, batch: int, max_len: int, *, dtype: Any = jnp.float32,
               start: jax.Array | None = None) -> KVCache:
        """An empty cache of ``max_len`` slots; ``start`` (default zeros): per-row left padding."""
        shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
        start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), start=start,
                   index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def slots(self, num_new: int) -> jax.Array:
        """Slots ``[num_new]`` the next ``num_new`` tokens are written to."""
        return self.index + jnp.arange(num_new, dtype=jnp.int32)

    def positions(self, num_new: int) -> jax.Array:
        """Rotary positions ``[batch, num_new]`` of the next tokens (0 for left padding)."""
        return jnp.maximum(self.slots(num_new)[None, :] - self.start[:, None], 0)

    def attention_mask(self, num_new: int, *, sliding_window: int | None = None) -> jax.Array:
        """Boolean ``[batch, 1, num_new, max_len]``: which cached slots each new token sees.

        Causal over slots, never a row's left padding; a padding query sees only itself.
        ``sliding_window``: only the last ``sliding_window`` slots, its own included (every slot
        stays in the cache; the window is a mask, as transformers' sliding-window mask over cache
        positions).
        """
        q = self.slots(num_new)[None, None, :, None]  # [1, 1, t, 1]
        k = jnp.arange(self.max_len, dtype=jnp.int32)[None, None, None, :]  # [1, 1, 1, T]
        real = k >= self.start[:, None, None, None]  # [b, 1, 1, T]
        visible = k <= q
        if sliding_window is not None:
            visible = visible & (k > q - sliding_window)
        return visible & (real | (k == q))


def write_layer(k_all: jax.Array, v_all: jax.Array, layer: jax.Array, index: jax.Array,
                k_new: jax.Array, v_new: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Store one layer's new ``k_new, v_new [b, t, kv, d]`` at slots ``index..index+t-1``.

    Returns the updated stacked ``k_all, v_all`` and that layer's slabs ``[b, max_len, kv, d]``
    (what the new queries attend over).
    """
    zero = jnp.zeros((), jnp.int32)
    at = (layer, zero, index, zero, zero)
    k_all = jax.lax.dynamic_update_slice(k_all, k_new[None].astype(k_all.dtype), at)
    v_all = jax.lax.dynamic_update_slice(v_all, v_new[None].astype(v_all.dtype), at)
    return k_all, v_all, k_all[layer], v_all[layer]
