"""Causal self-attention kernels that never build ``[b, heads, t, s]`` scores: splash attention
(Pallas, TPU) and cuDNN flash attention (GPU).

Both take the dense path's tensors (``q [b, t, heads, d]``, ``k, v [b, s, kv_heads, d]``, grouped
KV heads, scale ``d**-0.5``) plus ``segment_ids [b, s]`` instead of a boolean mask, and give what
``layers._dense_attention`` gives with ``layers.attention_mask(segment_ids, s)``: causal, within
one segment (packed sequences), padding (segment 0) attending to earlier padding. The dense path
stays the CPU path and the oracle (``tests/test_attention_kernels.py``); ``layers.attention`` picks
the kernel (``ModelConfig.attention_impl``).

Splash (``jax.experimental.pallas.ops.tpu.splash_attention``): one Mosaic kernel per sequence
(``vmap`` over the batch), the static causal (or local) mask skipping the blocks above the diagonal
and ``SegmentIds`` masking across segments inside the kernel. Its mask rule is the dense path's
exactly (same segment and ``j <= i``; padding is segment 0 like any other), so every row, padding
rows included, equals the dense path's. It reads grouped KV heads directly (query head ``h`` uses
KV head ``h // (heads / kv_heads)``, as transformers' ``repeat_kv``): no KV copy. Mosaic kernels
cannot be partitioned by XLA, so inside the training step (a mesh known from
``layers.activation_sharding``) it runs under ``shard_map``: batch over ("data", "fsdp") and heads
over "tensor" where they divide.

cuDNN (``jax.nn.dot_product_attention(implementation="cudnn")``): causal masking is cuDNN's own
(``is_causal``, no mask tensor). jax 0.10.2's public API has no segment ids: packed rows would need
the private ``q_offsets``/``kv_offsets`` of ``jax._src.cudnn.fused_attention_stablehlo``, which
also need a static maximum number of segments per row and a Hopper GPU visible at trace time (so
they cannot be compiled ahead of time on a machine without one). With ``segment_ids`` we therefore
pass the same-segment mask ``[b, 1, t, s]`` (cuDNN adds it as a bias, broadcast over heads): one
``[b, 1, t, s]`` array per batch instead of ``[b, heads, t, s]`` f32 scores. Without segment ids
nothing of size ``t x s`` exists.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

LANES = 128  # splash's blocks are multiples of the TPU lane count; shorter sequences are padded
_SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides the (padded) sequence is used


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None) -> None:
    b, t, n, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or n % k.shape[2]:
        raise ValueError(f"attention: q {q.shape} and k/v {k.shape}/{v.shape} do not match "
                         "([b, t, heads, d] and [b, s, kv_heads, d], heads a multiple of kv_heads)")
    if k.shape[1] != t:
        raise ValueError(f"causal self-attention kernels need t == s, got {t} and {k.shape[1]}")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [b, s] = {(b, t)}, got {segment_ids.shape}")


# ---------------------------------------------------------------------------------------------
# Splash attention (TPU).

@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, seq: int, sliding_window: int | None, logits_soft_cap: float | None,
                   interpret: bool):
    """The splash kernel for one sequence of ``heads`` query heads (built once per shape: the
    mask's block tables are computed on the host with numpy)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    if sliding_window is None:
        mask = splash.CausalMask((seq, seq))
    else:  # key j visible from query i when i - window < j <= i (transformers' sliding window)
        mask = splash.LocalMask((seq, seq), window_size=(sliding_window - 1, 0), offset=0)
    block = next(b for b in _SPLASH_BLOCKS if seq % b == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    with jax.ensure_compile_time_eval():  # concrete mask tables, safe to cache across traces
        return splash.make_splash_mha(splash.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=1,
                                      q_seq_shards=1, attn_logits_soft_cap=logits_soft_cap, interpret=interpret)


def _splash_local(q, k, v, segment_ids, *, sliding_window, logits_soft_cap, interpret):
    """Splash on one shard: ``q [b, t, n, d]`` (already scaled), ``k, v [b, s, kv, d]``."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    b, t, n, _ = q.shape
    pad = -t % LANES
    # Keys appended at the end are never seen by a real query (causality); the appended query
    # rows are dropped. Segment id 0 for them is as good as any.
    qh, kh, vh = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3) for x in (q, k, v))
    kernel = _splash_kernel(n, t + pad, sliding_window, logits_soft_cap, interpret)
    if segment_ids is None:
        out = jax.vmap(lambda q1, k1, v1: kernel(q1, k1, v1))(qh, kh, vh)
    else:
        seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)))
        out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=SegmentIds(s1, s1)))(qh, kh, vh, seg)
    return out.transpose(0, 2, 1, 3)[:, :t]  # [b, n, t, d] -> [b, t, n, d]


def _shard_specs(mesh: Any, b: int, n: int, kv: int) -> tuple[P, P]:
    """PartitionSpecs of ``[b, t, heads, d]`` and ``[b, t]``: batch over ("data", "fsdp") and heads
    over "tensor" where the sizes divide (else that dimension is replicated)."""
    sizes = dict(mesh.shape)
    rows = sizes.get("data", 1) * sizes.get("fsdp", 1)
    tensor = sizes.get("tensor", 1)
    batch = ("data", "fsdp") if rows > 1 and b % rows == 0 else None
    heads = "tensor" if tensor > 1 and n % tensor == 0 and kv % tensor == 0 else None
    return P(batch, None, heads, None), P(batch, None)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None, *,
                     mesh: Any = None, scale: float | None = None, sliding_window: int | None = None,
                     logits_soft_cap: float | None = None, interpret: bool = False) -> jax.Array:
    """Causal attention by the splash kernel: ``q [b, t, heads, d]``, ``k, v [b, t, kv_heads, d]``,
    ``segment_ids [b, t]`` (None: one sequence per row) -> ``[b, t, heads, d]`` in ``q.dtype``.

    ``mesh``: run under ``shard_map`` over it (required when the program spans several devices).
    ``scale``: the factor on ``q . k`` (default ``d ** -0.5``), applied to ``q`` in float32.
    ``sliding_window``: key ``j`` visible from query ``i`` only when ``i - j < sliding_window``.
    ``logits_soft_cap``: scores become ``cap * tanh(scores / cap)`` (after scaling, before masking).
    ``interpret``: run the kernel in Pallas' interpreter (CPU; the tests).
    """
    _check_shapes(q, k, v, segment_ids)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)  # splash does not scale the scores
    local = functools.partial(_splash_local, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                              interpret=interpret)
    if mesh is None or mesh.size == 1:
        return local(q, k, v, segment_ids)
    qkv_spec, seg_spec = _shard_specs(mesh, q.shape[0], q.shape[2], k.shape[2])
    if segment_ids is None:
        return jax.shard_map(lambda q1, k1, v1: local(q1, k1, v1, None), mesh=mesh,
                             in_specs=(qkv_spec,) * 3, out_specs=qkv_spec, check_vma=False)(q, k, v)
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,), out_specs=qkv_spec,
                         check_vma=False)(q, k, v, segment_ids)


# ---------------------------------------------------------------------------------------------
# cuDNN flash attention (GPU).

def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None, *,
                    scale: float | None = None, sliding_window: int | None = None,
                    implementation: str = "cudnn") -> jax.Array:
    """Causal attention by cuDNN's fused flash kernel (see the module docstring for segments).

    Shapes as :func:`splash_attention`. ``implementation="xla"`` runs the same call through
    XLA (what the CPU tests check the arguments with). No logit soft cap: cuDNN has none (the
    dispatch in ``layers.attention`` keeps such models on the XLA path).
    """
    _check_shapes(q, k, v, segment_ids)
    mask = None
    if segment_ids is not None:  # [b, 1, t, s]: cuDNN broadcasts it over heads as a bias
        mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    window = None if sliding_window is None else (sliding_window - 1, 0)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True,
                                        local_window_size=window, implementation=implementation)
