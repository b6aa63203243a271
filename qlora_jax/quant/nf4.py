"""Blockwise 4-bit quantization (NF4 / FP4) with double quantization, as in QLoRA.

Pure jnp functions; jit-able; any float input dtype. The semantics are bitsandbytes':

* blocks of ``blocksize`` run over the row-major flattened tensor (crossing rows), a final
  partial block has its own absmax;
* ``absmax = max|x|`` per block in float32, values are scaled by multiplying with
  ``1 / absmax`` and clamped to [-1, 1];
* the code is the nearest table value, decided by the 15 float32 midpoints; a value exactly on
  a midpoint takes the lower code;
* two codes per byte, the even element in the high nibble, an odd tail padded with the code
  of 0.0;
* double quantization: ``offset = mean(absmax)``, and ``absmax - offset`` is quantized to the
  exact nearest code of the signed 8-bit dynamic map in blocks of 256 (ties to the even index).

Deliberate differences from bitsandbytes' CPU backend (0.50), each tested:

* an all-zero block stores absmax 0 and codes 0x77 (the code of 0.0), whether or not it is the
  last, partial block. bitsandbytes-CPU stores 1e-38 for a partial zero block; its CUDA kernel
  packs zero blocks as 0x00. Both decode to zeros here too.
* the 8-bit codes of double quantization are the exact nearest codes (as the CUDA kernel
  computes them). bitsandbytes-CPU's encoder is approximate for ~0.2% of them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.quant import codes

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Quant4bit:
    """A 4-bit quantized tensor: the pytree a frozen base weight is stored as.

    Array fields (pytree children):
      packed:        uint8, two codes per byte, even element in the high nibble.
                     Shape ``shape[:-1] + (shape[-1] // 2,)`` when the last dimension is a multiple
                     of ``blocksize`` ("row layout": blocks never cross rows, so the tensor shards
                     along any leading axis), otherwise ``((n + 1) // 2,)``.
      absmax:        per-block scale. float32, or uint8 codes of the dynamic map when double-
                     quantized. Shape ``shape[:-1] + (shape[-1] // blocksize,)`` in row layout,
                     else ``(n_blocks,)``.
      nested_absmax: float32 ``(ceil(n_blocks / 256),)``, the absmax of each block of 256 absmax
                     values (empty when not double-quantized).
      offset:        float32 scalar, ``mean(absmax)`` subtracted before double quantization (0 when
                     not double-quantized).
    Static metadata: ``shape``, ``dtype`` (name of the original dtype), ``blocksize``,
    ``quant_type`` ("nf4" | "fp4").
    """

    packed: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array
    offset: jax.Array
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True))
    blocksize: int = dataclasses.field(metadata=dict(static=True))
    quant_type: str = dataclasses.field(metadata=dict(static=True))

    @property
    def double_quant(self) -> bool:
        return self.absmax.dtype == jnp.uint8

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.size // self.blocksize)

    @property
    def nbytes(self) -> int:
        """Bytes of storage: packed codes + absmax (+ nested absmax and offset)."""
        total = self.packed.size * 1 + self.absmax.size * self.absmax.dtype.itemsize
        if self.double_quant:
            total += self.nested_absmax.size * 4 + 4
        return int(total)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        return dequantize_4bit(self, dtype)


def row_layout(shape: tuple[int, ...], blocksize: int) -> bool:
    """Whether blocks align with the last dimension (then packed/absmax keep the leading dims)."""
    return len(shape) >= 1 and shape[-1] > 0 and shape[-1] % blocksize == 0


def _check_args(quant_type: str, blocksize: int) -> None:
    codes.code_table(quant_type)
    if blocksize not in codes.BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {codes.BLOCKSIZES}, got {blocksize}")


def _code_positions(scaled: jax.Array, thresholds: np.ndarray) -> jax.Array:
    """#{thresholds < x} for each element: the sorted-table position of the nearest code.

    A chain of elementwise comparisons that XLA fuses into one pass: no [n, 16] temporary.
    """
    pos = jnp.zeros(scaled.shape, jnp.uint8)
    for t in thresholds:
        pos = pos + (scaled > np.float32(t)).astype(jnp.uint8)
    return pos


def _nearest_dynamic_code(x: jax.Array) -> jax.Array:
    """Exact nearest code of the signed 8-bit dynamic map (ties to the even index), as uint8."""
    table = jnp.asarray(codes.DYNAMIC_MAP_SIGNED)
    hi = jnp.clip(jnp.searchsorted(table, x, side="left"), 1, table.shape[0] - 1)
    lo = hi - 1
    d_lo = jnp.abs(x - table[lo])
    d_hi = jnp.abs(table[hi] - x)
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    return jnp.where(pick_hi, hi, lo).astype(jnp.uint8)


def _block_absmax(flat: jax.Array, blocksize: int) -> jax.Array:
    n = flat.shape[0]
    n_blocks = -(-n // blocksize)
    padded = jnp.pad(jnp.abs(flat), (0, n_blocks * blocksize - n))
    return jnp.max(padded.reshape(n_blocks, blocksize), axis=1)


def _scale_inverse(absmax: jax.Array) -> jax.Array:
    # 1 / absmax; an all-zero block scales by 0 (bitsandbytes clamps absmax to 1e-38, a float32
    # subnormal that XLA flushes to zero): its values, all 0, take the code of 0.0 either way.
    return jnp.where(absmax > 0, jnp.float32(1.0) / absmax, jnp.float32(0.0))


def quantize_4bit(
    x: jax.Array,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
) -> Quant4bit:
    """Quantize ``x`` (f32 / bf16 / f16, any shape) blockwise to 4 bits.

    Costs a small multiple of ``x``'s own size in temporaries (one float32 copy and a uint8
    code array), so a 14336 x 4096 weight can be quantized on the device it lives on.
    """
    _check_args(quant_type, blocksize)
    x = jnp.asarray(x)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize_4bit takes float32, bfloat16 or float16, got {x.dtype}")
    shape = tuple(x.shape)
    n = math.prod(shape)
    if n == 0:
        raise ValueError(f"cannot quantize an empty tensor of shape {shape}")
    n_blocks = -(-n // blocksize)

    flat = x.reshape(-1).astype(jnp.float32)
    absmax = _block_absmax(flat, blocksize)  # [n_blocks] f32
    blocks = jnp.pad(flat, (0, n_blocks * blocksize - n)).reshape(n_blocks, blocksize)
    scaled = jnp.clip(blocks * _scale_inverse(absmax)[:, None], -1.0, 1.0).reshape(-1)[:n]
    if n % 2:
        scaled = jnp.pad(scaled, (0, 1))  # the odd tail pads with the code of 0.0
    pos = _code_positions(scaled, codes.midpoints(quant_type))
    if quant_type == "nf4":
        q = pos  # NF4's table is sorted: position == code
    else:
        q = jnp.asarray(codes.sort_order(quant_type))[pos]
    pairs = q.reshape(-1, 2)
    packed = (pairs[:, 0] << 4) | pairs[:, 1]

    if double_quant:
        absmax_q, nested_absmax, offset = _double_quantize(absmax)
    else:
        absmax_q, nested_absmax, offset = absmax, jnp.zeros((0,), jnp.float32), jnp.zeros((), jnp.float32)

    if row_layout(shape, blocksize):
        packed = packed.reshape(shape[:-1] + (shape[-1] // 2,))
        absmax_q = absmax_q.reshape(shape[:-1] + (shape[-1] // blocksize,))
    return Quant4bit(
        packed=packed,
        absmax=absmax_q,
        nested_absmax=nested_absmax,
        offset=offset,
        shape=shape,
        dtype=jnp.dtype(x.dtype).name,
        blocksize=blocksize,
        quant_type=quant_type,
    )


def _double_quantize(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """8-bit blockwise quantization of ``absmax - mean(absmax)`` with the signed dynamic map."""
    n_blocks = absmax.shape[0]
    nb = codes.NESTED_BLOCKSIZE
    n_nested = -(-n_blocks // nb)
    offset = jnp.mean(absmax)
    centered = absmax - offset
    padded = jnp.pad(centered, (0, n_nested * nb - n_blocks)).reshape(n_nested, nb)
    nested_absmax = jnp.max(jnp.abs(padded), axis=1)
    scaled = padded * _scale_inverse(nested_absmax)[:, None]
    absmax_q = _nearest_dynamic_code(scaled).reshape(-1)[:n_blocks]
    return absmax_q, nested_absmax, offset


def dequantize_absmax(q: Quant4bit) -> jax.Array:
    """The float32 per-block absmax, in ``q.absmax``'s shape (decoding double quantization).

    ``code8[c] * nested_absmax`` and ``+ offset`` are two float32 roundings, as in bitsandbytes.
    XLA's CPU and GPU code generators contract ``a * b + c`` into one FMA (one rounding), which
    changes ~7% of the absmax values by an ulp; ``nextafter(p, p)`` is the identity on ``p`` but
    opaque to the contraction (``optimization_barrier`` is not: it vanishes inside a fusion).
    """
    if not q.double_quant:
        return q.absmax.astype(jnp.float32)
    table = jnp.asarray(codes.DYNAMIC_MAP_SIGNED)
    # Index of the nested block of each absmax, from its flat position: works in row layout
    # and when the absmax array is sharded (the nested array is tiny and replicated).
    flat_index = jnp.arange(q.absmax.size, dtype=jnp.int32).reshape(q.absmax.shape)
    scale = q.nested_absmax[flat_index // codes.NESTED_BLOCKSIZE]
    product = table[q.absmax] * scale
    return jnp.nextafter(product, product) + q.offset


def unpack_codes(packed: jax.Array) -> jax.Array:
    """uint8 [..., k] -> uint8 [..., 2k]: high nibble first."""
    return jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(packed.shape[:-1] + (-1,))


@functools.cache
def _pair_table(quant_type: str) -> np.ndarray:
    """float32 [256, 2]: the values of a packed byte's high and low nibble."""
    table = np.asarray(codes.code_table(quant_type), np.float32)
    byte = np.arange(256)
    return np.stack([table[byte >> 4], table[byte & 0xF]], axis=-1)


def dequantize_4bit(q: Quant4bit, dtype: Any = None) -> jax.Array:
    """Decode to ``q.shape`` in ``dtype`` (default: the original dtype).

    Values are ``code[c] * absmax`` computed in float32 and rounded once to ``dtype``.
    """
    dtype = jnp.dtype(dtype or q.dtype)
    # The per-block scales are materialized once (the barrier keeps XLA from fusing their
    # decoding into the per-element loop, where it would be recomputed for every element), and
    # each packed byte decodes to its two values with one lookup in a 256-entry table of pairs.
    absmax = jax.lax.optimization_barrier(dequantize_absmax(q))
    values = jnp.asarray(_pair_table(q.quant_type))[q.packed].reshape(q.packed.shape[:-1] + (-1,))
    if row_layout(q.shape, q.blocksize):
        blocks = values.reshape(absmax.shape + (q.blocksize,))
        return (blocks * absmax[..., None]).astype(dtype).reshape(q.shape)
    n, bs = q.size, q.blocksize
    values = jnp.pad(values.reshape(-1)[:n], (0, q.n_blocks * bs - n)).reshape(q.n_blocks, bs)
    return (values * absmax.reshape(-1, 1)).astype(dtype).reshape(-1)[:n].reshape(q.shape)


def code_values(nibble: jax.Array, quant_type: str = "nf4") -> jax.Array:
    """float32 table values of 4-bit codes ``nibble`` (uint8, 0..15), elementwise and exact.

    ``sum_c (nibble == c) * table[c]``: one term is the code's value, the other fifteen are zeros,
    so the sum is exactly ``table[nibble]`` (a zero code value may come out as -0.0). No table
    gather: XLA fuses this into whatever consumes it (on TPU, into the matmul's operand), where a
    gather is a separate kernel whose output is written to memory. Not ``jnp.where(nibble == c,
    table[c], ...)`` either: ``where`` broadcasts each scalar to the full weight shape, and under
    the remat'd layer scan those 16 loop-invariant float32 constants per weight shape were hoisted
    out of the loop and kept alive through it (3.8 GiB per GPU at 8B; docs/gpu_aot.md). A
    multiply by a scalar literal broadcasts nothing.
    """
    table = np.asarray(codes.code_table(quant_type), np.float32)
    values = (nibble == 0).astype(jnp.float32) * table[0]
    for c in range(1, 16):
        values = values + (nibble == c).astype(jnp.float32) * table[c]
    return values


def dequantize_4bit_halves(q: Quant4bit, dtype: Any = None) -> tuple[jax.Array, jax.Array]:
    """The even and odd columns of the decoded weight, each ``[..., in / 2]`` in ``dtype``.

    ``hi = W[..., 0::2]`` (the high nibbles) and ``lo = W[..., 1::2]`` (the low nibbles), with
    exactly ``dequantize_4bit``'s values (``code * absmax`` in float32, rounded once to
    ``dtype``). Split this way a packed byte's two codes never need interleaving, so the decode
    is elementwise in the packed array's own layout and ``x @ W^T = x[..., 0::2] @ hi^T +
    x[..., 1::2] @ lo^T`` can fuse it into the two matmuls. Row layout only (``in`` a multiple
    of the blocksize).
    """
    if not row_layout(q.shape, q.blocksize):
        raise ValueError(f"dequantize_4bit_halves needs the row layout, got shape {q.shape} "
                         f"with blocksize {q.blocksize}")
    dtype = jnp.dtype(dtype or q.dtype)
    absmax = jax.lax.optimization_barrier(dequantize_absmax(q))  # [..., in / blocksize]
    scale = jnp.repeat(absmax, q.blocksize // 2, axis=-1)  # [..., in / 2]: a packed byte's block
    return tuple((code_values(nibble, q.quant_type) * scale).astype(dtype)
                 for nibble in (q.packed >> 4, q.packed & 0xF))


def storage_bits_per_param(q: Quant4bit) -> float:
    """Measured bits of storage per parameter of a quantized tensor."""
    return q.nbytes * 8 / q.size


def bits_per_param(blocksize: int = 64, double_quant: bool = True,
                   nested_blocksize: int = codes.NESTED_BLOCKSIZE) -> float:
    """Storage arithmetic of the QLoRA paper: 4 + 32/64 = 4.5 bits, or with double quantization
    4 + 8/64 + 32/(64*256) = 4.127 bits per parameter (large tensors)."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)
    return 4 + 32 / blocksize
