"""Fused 4-bit matmul (Pallas: Mosaic on TPU, Triton on GPU): ``x @ W^T`` straight from the packed codes.

The XLA path (``qlora_jax.models.layers.frozen_matmul``) leaves it to XLA's fusion heuristics
whether the decoded weight reaches HBM. These kernels read the stored weight tile by tile
(``packed`` uint8 ``[out, in/2]``, two codes per byte), decode each tile in VMEM and feed it to
the MXU (tensor cores on GPU): no float ``[out, in]`` weight (or nibble half) is written to HBM.

Contract (the same as ``frozen_matmul``, whose values it reproduces):

* :func:`nf4_matmul` ``(x [..., in], w) -> [..., out]`` in ``x.dtype``, float32 accumulation.
  Its custom VJP saves only ``w`` as stored and returns no gradient for it; the backward kernel
  re-decodes ``w`` to compute ``dx = g @ W``.
* Each weight element is decoded as ``code[c] * absmax`` in float32 and rounded once to
  ``x.dtype``: bit for bit the values of ``dequantize_4bit_halves``. The two nibble halves are
  multiplied separately (``x[..., 0::2] @ hi^T + x[..., 1::2] @ lo^T``, as ``_split_matmul``),
  so no interleaving is needed; only the summation order differs from the XLA path.
* Supported (:func:`supports`): a 2-D ``Quant4bit`` in row layout (``in % blocksize == 0``)
  whose ``out`` is a multiple of 128 and ``in`` a multiple of 256 and of the blocksize. The
  caller falls back to the XLA path for anything else (odd shapes, the flat layout); the rows of
  ``x`` are padded to the row tile.

Per-block scales. ``absmax`` (float32, or double-quantized uint8 codes + ``nested_absmax`` +
``offset``) is decoded *outside* the kernel by ``qlora_jax.quant.dequantize_absmax`` into
float32 ``[in/tk, tk/blocksize, out]`` (transposed; GPU: ``[out, in/blocksize]``): one small XLA
fusion whose output has 1/64 of the weight's elements (1/8 of the packed codes' bytes; 3.7 MB for
a 14336 x 4096 weight; twice that in HBM when ``tk/blocksize`` = 4 pads to 8 sublanes). Decoding
it in-kernel would need a 256-entry table lookup per block (a gather or a 255-way select) plus the
nested-block index; reading precomputed float32 scales costs 1/8 more bytes than the codes alone.

Tile layout. A packed tile ``[tn, tk/2]`` is widened to int32 and transposed to ``[tk/2, tn]``
in VMEM, so that a block's scale (a row of the ``[tk/blocksize, tn]`` scale tile) broadcasts
along sublanes; the forward kernel multiplies ``x [tm, tk/2] @ W^T-tile [tk/2, tn]``, the
backward one contracts ``g [tm, tn]`` with the same tile's ``tn`` axis. Codes decode with a
tree of 15 selects on the four bits (exact table values). The uint8 codes go into the kernel
as they are stored: the block ``[tn, tk/2]`` is a multiple of uint8's (32, 128) tile.

GPU (``backend="gpu"``, Pallas Triton): one program per ``[64 rows, 64 out]`` output tile loops
over the absmax blocks (``blocksize/2`` packed bytes per step, the block's scale a column), with
the same select-tree decode; the backward program per ``[64 rows, blocksize/2]`` of ``dx`` loops
over ``out``. Covered (:func:`supports_gpu`): row layout, ``out % 64 == 0``. Compiled for H100 in
the tests; its speed is not measured (``quant_matmul_impl="auto"`` keeps the XLA path on GPU).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from qlora_jax.quant import Quant4bit, code_table, dequantize_absmax
from qlora_jax.quant.nf4 import row_layout

# Tile candidates, in order of preference; the first that divides the dim is used.
TILE_M = 512  # rows of x per tile at most (x is padded to a multiple of the row tile)
_N_TILES = (512, 256, 128)  # out: the lane dim of the output and of the scale tile
_K_TILES = (512, 1024, 256)  # in: tk/2 packed bytes must be a multiple of 128 lanes
_M_ALIGN = 16  # a bf16 [tm, *] block needs tm % 16 == 0 (f32: 8)


def _tiles(shape: tuple[int, ...], blocksize: int) -> tuple[int, int] | None:
    """(tn, tk) for a ``[out, in]`` weight, or None when the kernel does not cover the shape."""
    if len(shape) != 2:
        return None
    out_f, in_f = shape
    tn = next((t for t in _N_TILES if out_f % t == 0), None)
    tk = next((t for t in _K_TILES if in_f % t == 0 and t % blocksize == 0), None)
    if tn is None or tk is None:
        return None
    return tn, tk


def supports(w: Any) -> bool:
    """Whether :func:`nf4_matmul` takes ``w`` (else use the XLA path): a 2-D ``Quant4bit`` in row
    layout with ``out % 128 == 0`` and ``in`` a multiple of 256 and of the blocksize."""
    return (isinstance(w, Quant4bit) and row_layout(w.shape, w.blocksize)
            and _tiles(w.shape, w.blocksize) is not None)


def _scale_tiles(w: Quant4bit, tk: int) -> jax.Array:
    """float32 per-block scales as ``[in/tk, tk/blocksize, out]``: block (k, :, n) is a tile's."""
    out_f, in_f = w.shape
    absmax = dequantize_absmax(w)  # [out, in/blocksize] f32
    return absmax.T.reshape(in_f // tk, tk // w.blocksize, out_f)


def _code_values(nibble: jax.Array, quant_type: str) -> jax.Array:
    """float32 table values of int32 codes 0..15: a tree of selects on the four bits (exact)."""
    table = [np.float32(v) for v in code_table(quant_type)]
    level = [jnp.where((nibble & 1) != 0, table[2 * i + 1], table[2 * i]) for i in range(8)]
    for bit in (2, 4, 8):
        on = (nibble & bit) != 0
        level = [jnp.where(on, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def _decode_tile_t(packed: jax.Array, scale: jax.Array, quant_type: str, blocksize: int,
                   dtype: Any) -> tuple[jax.Array, jax.Array]:
    """A packed tile ``[tn, tk/2]`` uint8 and its scales ``[tk/blocksize, tn]`` f32 ->
    ``(hi^T, lo^T)``, each ``[tk/2, tn]`` in ``dtype`` (``code * absmax`` in f32, one rounding)."""
    codes = packed.astype(jnp.int32).T  # [tk/2, tn]
    half_rows, tn = codes.shape
    nb = scale.shape[0]
    scale_rows = jnp.broadcast_to(scale[:, None, :], (nb, blocksize // 2, tn)).reshape(half_rows, tn)
    hi = _code_values(codes >> 4, quant_type) * scale_rows
    lo = _code_values(codes & 0xF, quant_type) * scale_rows
    return hi.astype(dtype), lo.astype(dtype)


def _forward_kernel(xe_ref, xo_ref, packed_ref, scale_ref, out_ref, acc_ref, *, quant_type, blocksize):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    hi_t, lo_t = _decode_tile_t(packed_ref[...], scale_ref[...], quant_type, blocksize, xe_ref.dtype)
    acc_ref[...] += (jnp.dot(xe_ref[...], hi_t, preferred_element_type=jnp.float32)
                     + jnp.dot(xo_ref[...], lo_t, preferred_element_type=jnp.float32))

    @pl.when(k == pl.num_programs(2) - 1)
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


_NT = (((1,), (1,)), ((), ()))  # contract the last dims of both operands: a @ b^T


def _backward_kernel(g_ref, packed_ref, scale_ref, dxe_ref, dxo_ref, acc_e_ref, acc_o_ref, *,
                     quant_type, blocksize):
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _init():
        acc_e_ref[...] = jnp.zeros_like(acc_e_ref)
        acc_o_ref[...] = jnp.zeros_like(acc_o_ref)

    hi_t, lo_t = _decode_tile_t(packed_ref[...], scale_ref[...], quant_type, blocksize, g_ref.dtype)
    g = g_ref[...]
    acc_e_ref[...] += jax.lax.dot_general(g, hi_t, _NT, preferred_element_type=jnp.float32)
    acc_o_ref[...] += jax.lax.dot_general(g, lo_t, _NT, preferred_element_type=jnp.float32)

    @pl.when(n == pl.num_programs(2) - 1)
    def _store():
        dxe_ref[...] = acc_e_ref[...].astype(dxe_ref.dtype)
        dxo_ref[...] = acc_o_ref[...].astype(dxo_ref.dtype)


def _row_tiling(m: int) -> tuple[int, int]:
    """(tm, padded m): rows of x are padded up to a multiple of the row tile."""
    padded = -(-m // _M_ALIGN) * _M_ALIGN
    tm = min(TILE_M, padded)
    return tm, -(-padded // tm) * tm


def _check(w: Any) -> tuple[int, int]:
    if not supports(w):
        shape = getattr(w, "shape", None)
        raise ValueError(f"nf4_matmul does not cover weight shape {shape} (see supports(); use the XLA path)")
    return _tiles(w.shape, w.blocksize)


def _forward(x2: jax.Array, w: Quant4bit, interpret: bool) -> jax.Array:
    """``x2 [m, in] @ W^T -> [m, out]`` in x2.dtype."""
    tn, tk = _check(w)
    out_f, in_f = w.shape
    m = x2.shape[0]
    tm, mp = _row_tiling(m)
    x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
    xe, xo = x2[:, 0::2], x2[:, 1::2]  # [mp, in/2] each
    kernel = functools.partial(_forward_kernel, quant_type=w.quant_type, blocksize=w.blocksize)
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, out_f), x2.dtype),
        grid=(mp // tm, out_f // tn, in_f // tk),
        in_specs=[
            pl.BlockSpec((tm, tk // 2), lambda i, j, k: (i, k)),
            pl.BlockSpec((tm, tk // 2), lambda i, j, k: (i, k)),
            pl.BlockSpec((tn, tk // 2), lambda i, j, k: (j, k)),
            pl.BlockSpec((None, tk // w.blocksize, tn), lambda i, j, k: (k, 0, j)),
        ],
        out_specs=pl.BlockSpec((tm, tn), lambda i, j, k: (i, j)),
        scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="nf4_matmul_fwd",
    )(xe, xo, w.packed, _scale_tiles(w, tk))
    return y[:m]


def _backward(g2: jax.Array, w: Quant4bit, interpret: bool) -> jax.Array:
    """``g2 [m, out] @ W -> [m, in]`` in g2.dtype (even and odd input columns interleaved)."""
    tn, tk = _check(w)
    out_f, in_f = w.shape
    m = g2.shape[0]
    tm, mp = _row_tiling(m)
    g2 = jnp.pad(g2, ((0, mp - m), (0, 0)))
    kernel = functools.partial(_backward_kernel, quant_type=w.quant_type, blocksize=w.blocksize)
    half = jax.ShapeDtypeStruct((mp, in_f // 2), g2.dtype)
    even, odd = pl.pallas_call(
        kernel,
        out_shape=(half, half),
        grid=(mp // tm, in_f // tk, out_f // tn),
        in_specs=[
            pl.BlockSpec((tm, tn), lambda i, k, j: (i, j)),
            pl.BlockSpec((tn, tk // 2), lambda i, k, j: (j, k)),
            pl.BlockSpec((None, tk // w.blocksize, tn), lambda i, k, j: (k, 0, j)),
        ],
        out_specs=(pl.BlockSpec((tm, tk // 2), lambda i, k, j: (i, k)),
                   pl.BlockSpec((tm, tk // 2), lambda i, k, j: (i, k))),
        scratch_shapes=[pltpu.VMEM((tm, tk // 2), jnp.float32), pltpu.VMEM((tm, tk // 2), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="nf4_matmul_bwd",
    )(g2, w.packed, _scale_tiles(w, tk))
    return jnp.stack([even[:m], odd[:m]], axis=-1).reshape(m, in_f)


# ---------------------------------------------------------------------------------------------
# GPU (Pallas Triton): the same decode, one absmax block (blocksize/2 packed bytes) per step.

_GPU_ROWS, _GPU_COLS = 64, 64  # rows of x and out features per program


def supports_gpu(w: Any) -> bool:
    """Whether the Triton kernels take ``w``: row layout, ``out % 64 == 0``."""
    return (isinstance(w, Quant4bit) and len(w.shape) == 2 and row_layout(w.shape, w.blocksize)
            and w.shape[0] % _GPU_COLS == 0)


def _gpu_forward_kernel(xe_ref, xo_ref, packed_ref, scale_ref, out_ref, *, quant_type, half):
    def step(j, acc):
        codes = packed_ref[:, pl.ds(j * half, half)].astype(jnp.int32)  # [cols, half]
        scale = scale_ref[:, pl.ds(j, 1)]  # [cols, 1]: this block's absmax per out feature
        hi = (_code_values(codes >> 4, quant_type) * scale).astype(xe_ref.dtype)
        lo = (_code_values(codes & 0xF, quant_type) * scale).astype(xe_ref.dtype)
        xe, xo = xe_ref[:, pl.ds(j * half, half)], xo_ref[:, pl.ds(j * half, half)]
        return acc + plgpu.dot(xe, hi, trans_b=True) + plgpu.dot(xo, lo, trans_b=True)

    steps = scale_ref.shape[1]
    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((xe_ref.shape[0], packed_ref.shape[0]), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def _gpu_backward_kernel(g_ref, packed_ref, scale_ref, dxe_ref, dxo_ref, *, quant_type):
    def step(n, carry):
        acc_e, acc_o = carry
        rows = pl.ds(n * _GPU_COLS, _GPU_COLS)
        codes = packed_ref[rows, :].astype(jnp.int32)  # [cols, half]
        scale = scale_ref[rows, :]  # [cols, 1]
        hi = (_code_values(codes >> 4, quant_type) * scale).astype(g_ref.dtype)
        lo = (_code_values(codes & 0xF, quant_type) * scale).astype(g_ref.dtype)
        g = g_ref[:, rows]  # [rows of g, cols]
        return acc_e + plgpu.dot(g, hi), acc_o + plgpu.dot(g, lo)

    zeros = jnp.zeros(dxe_ref.shape, jnp.float32)
    acc_e, acc_o = jax.lax.fori_loop(0, packed_ref.shape[0] // _GPU_COLS, step, (zeros, zeros))
    dxe_ref[...] = acc_e.astype(dxe_ref.dtype)
    dxo_ref[...] = acc_o.astype(dxo_ref.dtype)


def _gpu_rows(a: jax.Array) -> tuple[jax.Array, int]:
    m = a.shape[0]
    mp = -(-m // _GPU_ROWS) * _GPU_ROWS
    return jnp.pad(a, ((0, mp - m), (0, 0))), mp


def _gpu_forward(x2: jax.Array, w: Quant4bit, interpret: bool) -> jax.Array:
    out_f, in_f = w.shape
    m = x2.shape[0]
    x2, mp = _gpu_rows(x2)
    xe, xo = x2[:, 0::2], x2[:, 1::2]
    bm, bn, nb = _GPU_ROWS, _GPU_COLS, in_f // w.blocksize
    y = pl.pallas_call(
        functools.partial(_gpu_forward_kernel, quant_type=w.quant_type, half=w.blocksize // 2),
        out_shape=jax.ShapeDtypeStruct((mp, out_f), x2.dtype),
        grid=(mp // bm, out_f // bn),
        in_specs=[pl.BlockSpec((bm, in_f // 2), lambda i, j: (i, 0)),
                  pl.BlockSpec((bm, in_f // 2), lambda i, j: (i, 0)),
                  pl.BlockSpec((bn, in_f // 2), lambda i, j: (j, 0)),
                  pl.BlockSpec((bn, nb), lambda i, j: (j, 0))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="nf4_matmul_fwd_gpu",
    )(xe, xo, w.packed, dequantize_absmax(w))
    return y[:m]


def _gpu_backward(g2: jax.Array, w: Quant4bit, interpret: bool) -> jax.Array:
    out_f, in_f = w.shape
    m = g2.shape[0]
    g2, mp = _gpu_rows(g2)
    half, bm = w.blocksize // 2, _GPU_ROWS
    half_out = jax.ShapeDtypeStruct((mp, in_f // 2), g2.dtype)
    even, odd = pl.pallas_call(
        functools.partial(_gpu_backward_kernel, quant_type=w.quant_type),
        out_shape=(half_out, half_out),
        grid=(mp // bm, in_f // w.blocksize),
        in_specs=[pl.BlockSpec((bm, out_f), lambda i, k: (i, 0)),
                  pl.BlockSpec((out_f, half), lambda i, k: (0, k)),
                  pl.BlockSpec((out_f, 1), lambda i, k: (0, k))],
        out_specs=(pl.BlockSpec((bm, half), lambda i, k: (i, k)), pl.BlockSpec((bm, half), lambda i, k: (i, k))),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="nf4_matmul_bwd_gpu",
    )(g2, w.packed, dequantize_absmax(w))
    return jnp.stack([even[:m], odd[:m]], axis=-1).reshape(m, in_f)


def _check_gpu(w: Any) -> None:
    if not supports_gpu(w):
        raise ValueError(f"nf4_matmul (gpu) does not cover weight shape {getattr(w, 'shape', None)} "
                         "(see supports_gpu(); use the XLA path)")


def _gpu_forward_checked(x2, w, interpret):
    _check_gpu(w)
    return _gpu_forward(x2, w, interpret)


def _gpu_backward_checked(g2, w, interpret):
    _check_gpu(w)
    return _gpu_backward(g2, w, interpret)


_FORWARD = {"tpu": _forward, "gpu": _gpu_forward_checked}
_BACKWARD = {"tpu": _backward, "gpu": _gpu_backward_checked}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def nf4_matmul(x: jax.Array, w: Quant4bit, interpret: bool = False, backend: str = "tpu") -> jax.Array:
    """``x [..., in] @ W^T -> [..., out]`` in ``x.dtype`` from the packed 4-bit ``w`` ``[out, in]``.

    ``backend``: "tpu" (Mosaic) or "gpu" (Triton). ``interpret=True`` runs the kernels in Pallas'
    interpreter (any platform; the CPU tests). Raises ``ValueError`` when :func:`supports` (TPU) or
    :func:`supports_gpu` is False for ``w``.
    """
    lead = x.shape[:-1]
    y = _FORWARD[backend](x.reshape(-1, x.shape[-1]), w, interpret)
    return y.reshape(lead + (w.shape[0],))


def _nf4_matmul_fwd(x, w, interpret, backend):
    return nf4_matmul(x, w, interpret, backend), w


def _nf4_matmul_bwd(interpret, backend, w, g):
    lead = g.shape[:-1]
    dx = _BACKWARD[backend](g.reshape(-1, g.shape[-1]), w, interpret)
    return dx.reshape(lead + (w.shape[1],)), None  # None: the frozen weight gets no cotangent


nf4_matmul.defvjp(_nf4_matmul_fwd, _nf4_matmul_bwd)
