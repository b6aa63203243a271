"""NF4 / FP4 quantization against bitsandbytes (the reference for bytes) and closed-form math.

bitsandbytes-CPU 0.50 quirks these tests account for (each checked here, see DEVELOPERS.md):
* its ``dequantize_4bit`` is wrong for some N-D shapes, so its 1-D path is the reference;
* it scales the *partial* last block by division (``x / absmax``) where full blocks (and the
  CUDA kernel) multiply by ``1 / absmax``: codes there may differ where the two round across a
  midpoint; we multiply everywhere;
* its 8-bit double-quantization encoder is approximate for ~0.2% of codes; ours is exact;
* it stores absmax 1e-38 for an all-zero partial block (0 for a full one); we store 0;
* its C kernel decodes FP4 code 8 as -0.0 where its table (and we) say +0.0.
"""

from __future__ import annotations

import math
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _support import require

torch = require("torch")
bnbF = require("bitsandbytes.functional")

from qlora_jax.quant import (  # noqa: E402
    Quant4bit,
    bits_per_param,
    code_table,
    codes,  # noqa: E402
    dequantize_4bit,
    quantize_4bit,
    storage_bits_per_param,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _to_jax(xt: torch.Tensor, dtype: str) -> jax.Array:
    return jnp.asarray(xt.float().numpy()).astype(dtype)


def _bnb_quantize(xt, quant_type, blocksize, double_quant):
    packed, state = bnbF.quantize_4bit(
        xt, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    return packed.numpy().reshape(-1), state


def _bnb_dequantize_flat(packed, state, dtype) -> np.ndarray:
    """bitsandbytes' dequantization through its (correct) 1-D path, as float32 numpy."""
    shape = state.shape
    state.shape = torch.Size([math.prod(shape)])
    state.dtype = dtype
    try:
        out = bnbF.dequantize_4bit(torch.from_numpy(packed).reshape(-1, 1), state)
    finally:
        state.shape = shape
    return out.float().numpy().reshape(-1)


def _state_to_quant4bit(packed, state, like: Quant4bit) -> Quant4bit:
    dq = state.state2 is not None
    return Quant4bit(
        packed=jnp.asarray(packed).reshape(like.packed.shape),
        absmax=jnp.asarray(state.absmax.numpy()).reshape(like.absmax.shape),
        nested_absmax=jnp.asarray(state.state2.absmax.numpy()) if dq else like.nested_absmax,
        offset=jnp.asarray(state.offset.numpy()) if dq else like.offset,
        shape=like.shape,
        dtype=like.dtype,
        blocksize=like.blocksize,
        quant_type=like.quant_type,
    )


def _numpy_codes(x: np.ndarray, quant_type: str, blocksize: int, divide_last: bool = False):
    """Independent reference: nearest code by the 15 float32 midpoints (ties lower)."""
    flat = x.reshape(-1).astype(np.float32)
    n = flat.size
    nb = -(-n // blocksize)
    absmax = np.array([np.abs(flat[i * blocksize:(i + 1) * blocksize]).max() for i in range(nb)], np.float32)
    scaled = np.empty(n, np.float32)
    for i in range(nb):
        blk = flat[i * blocksize:(i + 1) * blocksize]
        if absmax[i] == 0:
            scaled[i * blocksize:(i + 1) * blocksize] = 0
        elif divide_last and i == nb - 1:
            scaled[i * blocksize:(i + 1) * blocksize] = blk / absmax[i]
        else:
            scaled[i * blocksize:(i + 1) * blocksize] = blk * (np.float32(1) / absmax[i])
    scaled = np.clip(scaled, -1, 1)
    pos = np.searchsorted(codes.midpoints(quant_type), scaled, side="left")
    return codes.sort_order(quant_type)[pos], absmax


def _unpack(packed: np.ndarray, n: int) -> np.ndarray:
    p = packed.reshape(-1)
    return np.stack([p >> 4, p & 15], -1).reshape(-1)[:n]


def test_code_tables_match_bitsandbytes():
    for qt in ("nf4", "fp4"):
        ref = bnbF.get_4bit_type(qt, device="cpu").numpy().astype(np.float32)
        np.testing.assert_array_equal(ref.view(np.uint32), code_table(qt).view(np.uint32))
    dyn = bnbF.create_dynamic_map(signed=True).numpy().astype(np.float32)
    np.testing.assert_array_equal(dyn.view(np.uint32), codes.DYNAMIC_MAP_SIGNED.view(np.uint32))
    # NF4: 7 negative levels, an exact zero at index 7, 8 positive, ends at -1 and 1.
    nf4 = code_table("nf4")
    assert (nf4[:7] < 0).all() and nf4[7] == 0 and (nf4[8:] > 0).all()
    assert nf4[0] == -1 and nf4[-1] == 1


SHAPES = [(64, 128), (2, 96), (96, 80), (7, 13), (1000,), (1,), (3, 5, 64), (129, 65)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES)
def test_codes_and_absmax_match_bitsandbytes(quant_type, dtype, shape):
    # a seed derived from the case's name: the same data in every process (hash() of a str is salted)
    rng = np.random.default_rng(zlib.crc32(repr((quant_type, dtype, shape)).encode()))
    x = rng.standard_normal(shape).astype(np.float32)
    xt = torch.from_numpy(x).to(DTYPES[dtype])
    blocksize = 64
    ref_packed, ref_state = _bnb_quantize(xt, quant_type, blocksize, double_quant=False)
    q = jax.jit(lambda a: quantize_4bit(a, quant_type=quant_type, blocksize=blocksize, double_quant=False))(
        _to_jax(xt, dtype)
    )
    chex.assert_type(q.packed, jnp.uint8)
    chex.assert_type(q.absmax, jnp.float32)
    assert q.shape == shape and q.dtype == dtype
    n = x.size
    ours_codes = _unpack(np.asarray(q.packed), n)
    ref_codes = _unpack(ref_packed, n)
    full = (n // blocksize) * blocksize
    # First-level absmax: identical, all blocks.
    np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1), ref_state.absmax.numpy())
    # Full blocks: identical codes.
    np.testing.assert_array_equal(ours_codes[:full], ref_codes[:full])
    # Partial last block: we multiply by 1/absmax, bitsandbytes-CPU divides. Ours equals the
    # independent reference, and each difference from bnb is a value the two roundings put on
    # either side of a midpoint.
    xf = xt.float().numpy()
    mul_codes, _ = _numpy_codes(xf, quant_type, blocksize)
    div_codes, _ = _numpy_codes(xf, quant_type, blocksize, divide_last=True)
    np.testing.assert_array_equal(ours_codes, mul_codes)
    np.testing.assert_array_equal(ref_codes, div_codes)
    # Odd tail: padded with the code of 0.0.
    if n % 2:
        pad = np.asarray(q.packed).reshape(-1)[-1] & 15
        assert code_table(quant_type)[pad] == 0


@pytest.mark.parametrize("blocksize", codes.BLOCKSIZES)
def test_every_blocksize_matches_bitsandbytes(blocksize):
    rng = np.random.default_rng(blocksize)
    x = rng.standard_normal((16, 4096)).astype(np.float32) * rng.uniform(0.01, 3, (16, 1)).astype(np.float32)
    ref_packed, ref_state = _bnb_quantize(torch.from_numpy(x), "nf4", blocksize, double_quant=False)
    q = quantize_4bit(jnp.asarray(x), blocksize=blocksize, double_quant=False)
    np.testing.assert_array_equal(np.asarray(q.packed).reshape(-1), ref_packed)
    np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1), ref_state.absmax.numpy())
    chex.assert_shape(q.packed, (16, 2048))
    chex.assert_shape(q.absmax, (16, 4096 // blocksize))


def test_zero_blocks_and_outliers():
    x = np.random.default_rng(3).standard_normal(64 * 5 + 10).astype(np.float32)
    x[64:128] = 0.0  # a full zero block
    x[-10:] = 0.0  # an all-zero partial last block
    x[200] = 1e4  # a large outlier in block 3
    xt = torch.from_numpy(x)
    ref_packed, ref_state = _bnb_quantize(xt, "nf4", 64, double_quant=False)
    q = quantize_4bit(jnp.asarray(x), double_quant=False)
    packed = np.asarray(q.packed)
    # Full zero block: 0x77 like bitsandbytes-CPU (code 7 is 0.0); absmax 0 in both.
    assert (packed[32:64] == 0x77).all() and (ref_packed[32:64] == 0x77).all()
    assert float(q.absmax[1]) == 0.0 == ref_state.absmax[1].item()
    # Partial zero block: we keep absmax 0 (bnb-CPU stores 1e-38); codes are 0x77 in both.
    assert float(q.absmax[-1]) == 0.0
    assert ref_state.absmax[-1].item() == pytest.approx(1e-38)
    assert (packed[-5:] == 0x77).all() and (ref_packed[-5:] == 0x77).all()
    np.testing.assert_array_equal(packed, ref_packed)
    # The outlier's block: the outlier decodes exactly, its neighbours collapse to 0.
    deq = np.asarray(dequantize_4bit(q))
    assert deq[200] == np.float32(1e4)
    assert (deq[192:256][np.abs(x[192:256]) < 1e4 * 0.03] == 0).all()
    assert (deq[64:128] == 0).all() and (deq[-10:] == 0).all()
    # A zero block packed CUDA-style (0x00 = code -1.0 times absmax 0) decodes to zeros too.
    cuda_style = Quant4bit(q.packed.at[32:64].set(0), q.absmax, q.nested_absmax, q.offset,
                           q.shape, q.dtype, q.blocksize, q.quant_type)
    assert (np.asarray(dequantize_4bit(cuda_style))[64:128] == 0).all()


def _exact_nearest_dynamic(v: np.ndarray) -> np.ndarray:
    """Nearest code of the signed dynamic map in float64, ties to the even index."""
    table = codes.DYNAMIC_MAP_SIGNED.astype(np.float64)
    d = np.abs(v.astype(np.float64)[:, None] - table[None, :])
    best = d.min(axis=1, keepdims=True)
    ties = d == best
    idx = np.argmax(ties, axis=1)
    two = ties.sum(axis=1) > 1
    for i in np.nonzero(two)[0]:
        cands = np.nonzero(ties[i])[0]
        even = cands[cands % 2 == 0]
        idx[i] = even[0] if even.size else cands[0]
    return idx.astype(np.uint8)


@pytest.mark.parametrize("shape", [(512, 1024), (1000, 130), (64,)])
def test_double_quant_exact_nearest_codes(shape, record_property):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    if x.ndim == 2:
        x *= rng.uniform(0.2, 5, (shape[0], 1)).astype(np.float32)  # rows with different scales
    ref_packed, ref_state = _bnb_quantize(torch.from_numpy(x), "nf4", 64, double_quant=True)
    q = jax.jit(lambda a: quantize_4bit(a))(jnp.asarray(x))
    chex.assert_type(q.absmax, jnp.uint8)
    chex.assert_type(q.nested_absmax, jnp.float32)
    np.testing.assert_array_equal(np.asarray(q.packed).reshape(-1), ref_packed)
    # offset = mean(absmax) in float32: within 2 ulp of the exact mean (torch-CPU, CUDA and XLA
    # sum in different orders and may differ from each other by an ulp).
    absmax = _numpy_codes(x, "nf4", 64)[1]
    exact = np.float32(absmax.astype(np.float64).mean())
    assert abs(float(q.offset) - float(exact)) <= 2 * float(np.spacing(exact))
    assert abs(ref_state.offset.item() - float(exact)) <= 2 * float(np.spacing(exact))
    # Nested absmax: max |absmax - offset| per 256, exactly, and bnb's up to that offset ulp.
    centered = absmax - np.float32(q.offset)
    pad = -centered.size % 256
    expect_nested = np.abs(np.pad(centered, (0, pad))).reshape(-1, 256).max(1)
    np.testing.assert_array_equal(np.asarray(q.nested_absmax), expect_nested)
    np.testing.assert_allclose(np.asarray(q.nested_absmax), ref_state.state2.absmax.numpy(), rtol=1e-5)
    # Codes: the exact nearest code of (absmax - offset) * (1 / nested_absmax).
    nested = np.asarray(q.nested_absmax)[np.arange(absmax.size) // 256]
    with np.errstate(divide="ignore"):
        scaled = centered * np.where(nested > 0, np.float32(1) / nested, np.float32(0))
    ours = np.asarray(q.absmax).reshape(-1)
    np.testing.assert_array_equal(ours, _exact_nearest_dynamic(scaled))
    # bitsandbytes-CPU's approximate encoder differs in a small fraction of codes, by one step.
    # (A nested block whose absmax values all equal the offset has nested absmax 0: bnb codes its
    # 0 * inf = NaN as index 0, we as the code of 0.0; both decode to the offset.)
    live = nested > 0
    ours, theirs = ours[live], ref_state.absmax.numpy()[live]
    differ = int((ours != theirs).sum())
    record_property("bnb_cpu_code_mismatches", f"{differ}/{ours.size}")
    assert differ <= max(2, 0.01 * ours.size)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max(initial=0) <= 1


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(512, 1024), (96, 80), (2, 96), (1000,), (7, 13)])
def test_dequantize_bnb_state_bit_for_bit(quant_type, double_quant, shape):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    packed, state = _bnb_quantize(torch.from_numpy(x), quant_type, 64, double_quant)
    for dtype, tdt in DTYPES.items():
        like = quantize_4bit(jnp.zeros(shape, dtype), quant_type=quant_type, double_quant=double_quant)
        q = _state_to_quant4bit(packed, state, like)
        ours = jax.jit(dequantize_4bit)(q)
        chex.assert_shape(ours, shape)
        chex.assert_type(ours, jnp.dtype(dtype))
        ours = np.asarray(ours.astype(jnp.float32)).reshape(-1)
        ref = _bnb_dequantize_flat(packed, state, tdt)
        if quant_type == "fp4":  # bnb's C kernel decodes code 8 as -0.0; the table says +0.0
            ref = np.where(ref == 0, np.float32(0), ref)
            ours = np.where(ours == 0, np.float32(0), ours)
        np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_dequantize_our_state_matches_closed_form():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((256, 512)).astype(np.float32)
    q = quantize_4bit(jnp.asarray(x))
    codes4 = _unpack(np.asarray(q.packed), x.size)
    table = codes.DYNAMIC_MAP_SIGNED
    nested = np.asarray(q.nested_absmax)[np.arange(q.absmax.size) // 256]
    absmax = (table[np.asarray(q.absmax).reshape(-1)] * nested).astype(np.float32) + np.float32(q.offset)
    expect = (code_table("nf4")[codes4].reshape(-1, 64) * absmax[:, None]).reshape(x.shape)
    np.testing.assert_array_equal(np.asarray(dequantize_4bit(q)), expect)
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize_4bit)(q)), expect)


@pytest.mark.parametrize("quant_type,expected", [("nf4", 8.457e-3), ("fp4", 1.486e-2)])
def test_mse_on_standard_normal(quant_type, expected):
    x = np.random.default_rng(0).standard_normal(2**22).astype(np.float32)
    for dq in (False, True):
        q = quantize_4bit(jnp.asarray(x), quant_type=quant_type, double_quant=dq)
        mse = float(np.mean((np.asarray(dequantize_4bit(q)) - x) ** 2))
        assert mse == pytest.approx(expected, rel=0.01)
    packed, state = _bnb_quantize(torch.from_numpy(x), quant_type, 64, double_quant=False)
    ref = _bnb_dequantize_flat(packed, state, torch.float32)
    ours_nodq = quantize_4bit(jnp.asarray(x), quant_type=quant_type, double_quant=False)
    assert float(np.mean((np.asarray(dequantize_4bit(ours_nodq)) - x) ** 2)) == pytest.approx(
        float(np.mean((ref - x) ** 2)), rel=1e-6
    )


def test_storage_bits_per_param():
    assert bits_per_param(64, double_quant=False) == 4.5
    assert bits_per_param(64, double_quant=True) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert round(bits_per_param(64, True), 3) == 4.127
    x = jnp.ones((4096, 4096), jnp.bfloat16)
    assert storage_bits_per_param(quantize_4bit(x, double_quant=False)) == pytest.approx(4.5)
    # Plus 32 bits of offset for the whole tensor.
    assert storage_bits_per_param(quantize_4bit(x)) == pytest.approx(
        bits_per_param(64, True) + 32 / x.size)


def test_quantize_memory_is_a_small_multiple_of_the_weight():
    """No [n, 16] temporaries: compiled temporaries stay within a few times the weight size."""
    x = jax.ShapeDtypeStruct((1024, 4096), jnp.bfloat16)
    compiled = jax.jit(lambda a: quantize_4bit(a)).lower(x).compile()
    mem = compiled.memory_analysis()
    weight_bytes = 1024 * 4096 * 2
    assert mem.temp_size_in_bytes <= 4 * weight_bytes, mem
    assert mem.temp_size_in_bytes < 16 * 1024 * 4096  # far below one byte per (element, code)


def test_quant4bit_is_a_pytree_and_jits():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((128, 256)), jnp.bfloat16)
    q = quantize_4bit(x)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 4
    q2 = jax.tree_util.tree_unflatten(treedef, leaves)
    assert q2.shape == (128, 256) and q2.blocksize == 64 and q2.quant_type == "nf4" and q2.dtype == "bfloat16"
    out = jax.jit(lambda t: dequantize_4bit(t))(q2)
    chex.assert_type(out, jnp.bfloat16)
    chex.assert_shape(out, (128, 256))
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(dequantize_4bit(q), np.float32))
    chex.assert_type(dequantize_4bit(q, jnp.float32), jnp.float32)


def test_bad_arguments_are_named():
    x = jnp.ones((64,), jnp.float32)
    with pytest.raises(ValueError, match="blocksize"):
        quantize_4bit(x, blocksize=48)
    with pytest.raises(ValueError, match="quant_type"):
        quantize_4bit(x, quant_type="int4")
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        quantize_4bit(jnp.ones((64,), jnp.int32))
