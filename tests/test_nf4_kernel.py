"""The Pallas NF4/FP4 matmul (``qlora_jax.kernels.nf4_matmul``) against the XLA path (``frozen_matmul``).

On CPU the kernels run in Pallas' interpreter (``interpret=True``): same tiling, same in-kernel
decode, so the values are checked here and the Mosaic lowering by the TPU compile at the end. The
weights are random ``Quant4bit`` states built directly (random codes and scales, double-quantized
or not), which exercises every code and keeps the 8B shapes fast. The kernel decodes each weight
to the XLA path's exact values; only the order of the float32 sums differs (tiles of 512 inputs,
even and odd columns apart), so float32 results agree to ``REL`` of the output's magnitude.
"""

from __future__ import annotations

import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from _support import SHARED, compile_in_venv  # noqa: E402

from qlora_jax.errors import ModelFileError  # noqa: E402
from qlora_jax.kernels import nf4_matmul as kernel_lib  # noqa: E402
from qlora_jax.lora import LoraConfig, LoRAParam  # noqa: E402
from qlora_jax.models import CausalLM, ModelConfig, QuantConfig  # noqa: E402
from qlora_jax.models.layers import frozen_matmul, quant_matmul, quantize_jit  # noqa: E402
from qlora_jax.quant import NESTED_BLOCKSIZE, Quant4bit, code_table, dequantize_4bit, quantize_4bit  # noqa: E402

REL = 1e-6  # max |error| / max |exact|, float32 results
ROWS = 8  # tokens: a small M keeps the interpreter fast; the kernel pads them to its row tile


def random_quant(out_f: int, in_f: int, *, quant_type: str = "nf4", double_quant: bool = True,
                 seed: int = 0) -> Quant4bit:
    """A random 4-bit state in row layout: every code and (8-bit) absmax code equally likely."""
    rng = np.random.default_rng(seed)
    blocks = out_f * in_f // 64
    packed = rng.integers(0, 256, (out_f, in_f // 2), dtype=np.uint8)
    if double_quant:
        absmax = rng.integers(0, 256, (out_f, in_f // 64), dtype=np.uint8)
        nested = rng.uniform(0.005, 0.02, (-(-blocks // NESTED_BLOCKSIZE),)).astype(np.float32)
        offset = np.float32(0.03)
    else:
        absmax = rng.uniform(0.01, 0.05, (out_f, in_f // 64)).astype(np.float32)
        nested, offset = np.zeros((0,), np.float32), np.float32(0.0)
    return Quant4bit(packed=jnp.asarray(packed), absmax=jnp.asarray(absmax), nested_absmax=jnp.asarray(nested),
                     offset=jnp.asarray(offset), shape=(out_f, in_f), dtype="bfloat16", blocksize=64,
                     quant_type=quant_type)


def _rel(got: jax.Array, want: jax.Array) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


_kernel_fwd = jax.jit(lambda x, w: kernel_lib.nf4_matmul(x, w, True))
_kernel_dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: kernel_lib.nf4_matmul(x, w, True), x)[1](g)[0])
_xla_fwd = jax.jit(frozen_matmul)
_xla_dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: frozen_matmul(x, w), x)[1](g)[0])


def _check_against_xla(w: Quant4bit, lead=(ROWS,)) -> dict[str, float]:
    """float32 forward and dx of the kernel against the XLA path and against float64 products of
    the independently decoded weight (``dequantize_4bit``): the relative errors, as a dict."""
    out_f, in_f = w.shape
    x = jax.random.normal(jax.random.key(1), lead + (in_f,))
    g = jax.random.normal(jax.random.key(2), lead + (out_f,))
    y, dx = _kernel_fwd(x, w), _kernel_dx(x, w, g)
    chex.assert_shape(y, lead + (out_f,))
    chex.assert_shape(dx, lead + (in_f,))
    chex.assert_type([y, dx], jnp.float32)
    dense = np.asarray(dequantize_4bit(w, jnp.float32), np.float64)  # [out, in]
    y64 = np.asarray(x, np.float64) @ dense.T
    dx64 = np.asarray(g, np.float64) @ dense
    y_xla, dx_xla = _xla_fwd(x, w), _xla_dx(x, w, g)
    return dict(fwd=_rel(y, y64), dx=_rel(dx, dx64), fwd_vs_xla=_rel(y, y_xla), dx_vs_xla=_rel(dx, dx_xla),
                xla_fwd=_rel(y_xla, y64), xla_dx=_rel(dx_xla, dx64))


def _assert_close(err: dict[str, float], what) -> None:
    """Kernel within REL of the exact products; kernel vs XLA within REL plus the XLA path's own
    float32 error (its single [in]-long sums are the less exact of the two)."""
    assert err["fwd"] <= REL and err["dx"] <= REL, (what, err)
    assert err["fwd_vs_xla"] <= REL + err["xla_fwd"] and err["dx_vs_xla"] <= REL + err["xla_dx"], (what, err)


def _shape_of(shape: tuple[int, int]) -> Quant4bit:
    """The abstract NF4 + DQ state of a weight shape (no arrays): enough for ``supports``."""
    return jax.eval_shape(lambda: quantize_4bit(jnp.zeros(shape, jnp.bfloat16)))


def _projection_shapes() -> dict[tuple[int, int], str]:
    shapes = {}
    for name in ("llama-3.1-8b-instruct", "qwen2.5-3b-instruct"):
        config = ModelConfig.from_hf(SHARED / "model_configs" / f"{name}.json")
        for proj, shape in config.linear_shapes().items():
            shapes.setdefault(shape, f"{name}:{proj}")
    return shapes


def test_code_decode_is_the_table():
    """The in-kernel select tree gives each code's exact table value (nf4 and fp4)."""
    nibble = jnp.arange(16, dtype=jnp.int32)
    for quant_type in ("nf4", "fp4"):
        got = np.asarray(kernel_lib._code_values(nibble, quant_type))
        np.testing.assert_array_equal(got, np.asarray(code_table(quant_type), np.float32))


def test_every_projection_shape_is_covered():
    """Every decoder projection of LLaMA-3.1-8B and Qwen2.5-3B takes the kernel (none falls back)."""
    shapes = _projection_shapes()
    assert len(shapes) == 8, shapes  # q/o, k/v, gate/up, down per model
    for shape, label in shapes.items():
        assert kernel_lib.supports(_shape_of(shape)), (label, shape)


# The exact shapes whose tilings differ: the largest out (14336: 28 out tiles), the largest in
# (14336: 28 in tiles), Qwen's 11008 (in tiles of 256, out tiles of 256) and its 256-wide k/v.
# The remaining projections (4096 x 4096, 1024 x 4096, 2048 x 2048, 11008 x 2048) tile like these.
EXACT = [(14336, 4096), (4096, 14336), (2048, 11008), (256, 2048)]


@pytest.mark.slow
@pytest.mark.parametrize("shape", EXACT, ids=lambda s: f"{s[0]}x{s[1]}")
def test_projection_shapes_match_xla(shape):
    """Exact 8B / 3B projection shapes, NF4 + double quantization, forward and dx in float32."""
    assert shape in _projection_shapes()
    _assert_close(_check_against_xla(random_quant(*shape, seed=sum(shape))), shape)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("fp4", True), ("fp4", False)])
def test_quant_types_and_double_quant(quant_type, double_quant):
    """Both code tables, with and without double quantization (NF4 + DQ: the shapes above); two
    row tiles (the second padded), five out tiles of 128, three in tiles of 512."""
    w = random_quant(640, 1536, quant_type=quant_type, double_quant=double_quant, seed=3)
    _assert_close(_check_against_xla(w, lead=(4, 130)), (quant_type, double_quant))


def test_bfloat16_within_one_rounding():
    """bf16 compute: both paths round the same float32 products' sums once to bf16, so they
    differ by at most one bf16 step (2^-8 relative) per element."""
    w = random_quant(1024, 4096, seed=5)
    x = jax.random.normal(jax.random.key(1), (ROWS, 4096)).astype(jnp.bfloat16)
    got = np.asarray(_kernel_fwd(x, w), np.float32)
    want = np.asarray(_xla_fwd(x, w), np.float32)
    assert np.all(np.abs(got - want) <= np.abs(want) * 2.0 ** -7 + 1e-30), np.abs(got - want).max()



@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_gpu_kernel_matches_xla(quant_type, double_quant):
    """The Triton kernels (``backend="gpu"``) in the interpreter: forward and dx, rows padded to 64."""
    w = random_quant(384, 1024, quant_type=quant_type, double_quant=double_quant, seed=11)
    x = jax.random.normal(jax.random.key(1), (70, 1024))
    g = jax.random.normal(jax.random.key(2), (70, 384))
    y = jax.jit(lambda x, w: kernel_lib.nf4_matmul(x, w, True, "gpu"))(x, w)
    dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: kernel_lib.nf4_matmul(x, w, True, "gpu"), x)[1](g)[0])(x, w, g)
    dense = np.asarray(dequantize_4bit(w, jnp.float32), np.float64)
    assert _rel(y, np.asarray(x, np.float64) @ dense.T) <= REL
    assert _rel(dx, np.asarray(g, np.float64) @ dense) <= REL
    assert _rel(y, _xla_fwd(x, w)) <= 2 * REL + _rel(_xla_fwd(x, w), np.asarray(x, np.float64) @ dense.T)
    assert kernel_lib.supports_gpu(w) and not kernel_lib.supports_gpu(_shape_of((96, 1024)))

def test_only_the_stored_weight_is_saved():
    """The custom VJP's residuals are the stored weight (uint8 codes and absmax codes, the small
    float32 nested absmax and offset), never a float ``[out, in]`` weight or nibble half."""
    w = random_quant(512, 1024, seed=7)
    x = jax.ShapeDtypeStruct((ROWS, 1024), jnp.float32)
    pullback = jax.eval_shape(lambda x: jax.vjp(lambda x: kernel_lib.nf4_matmul(x, w, True), x)[1], x)
    leaves = jax.tree.leaves(pullback)
    assert sorted((str(a.dtype), a.shape) for a in leaves) == sorted(
        (str(a.dtype), a.shape) for a in jax.tree.leaves(w)), leaves


def test_odd_shapes_fall_back_to_xla():
    """Flat layout (in % 64 != 0), out not a multiple of 128, in not a multiple of 256: not
    covered; the dispatcher then takes the XLA path (the same values bit for bit, no kernel)."""
    for shape in [(300, 200), (200, 256), (256, 320)]:
        assert not kernel_lib.supports(_shape_of(shape)), shape
    shape = (300, 200)
    w = quantize_jit(jax.random.normal(jax.random.key(0), shape) * 0.02, quant_type="nf4", blocksize=64,
                     double_quant=True)
    x = jax.random.normal(jax.random.key(1), (ROWS, shape[1]))
    dispatched = jax.jit(lambda x, w: quant_matmul(x, w, "pallas", interpret=True))
    np.testing.assert_array_equal(dispatched(x, w), _xla_fwd(x, w))
    assert "pallas_call" not in str(jax.make_jaxpr(lambda x: quant_matmul(x, w, "pallas"))(x))
    with pytest.raises(ValueError, match="does not cover"):
        kernel_lib.nf4_matmul(x, w, True)


def test_dispatch_selects_the_kernel():
    """A weight quantized by ``quantize_4bit`` through the dispatcher: the kernel, within REL of
    ``x @ dequantize_4bit(W)^T`` in float64; "auto" off TPU and dense weights take the XLA path."""
    w = quantize_jit(jax.random.normal(jax.random.key(0), (256, 512)) * 0.02, quant_type="nf4", blocksize=64,
                     double_quant=True)
    x = jax.random.normal(jax.random.key(1), (ROWS, 512))
    assert "pallas_call" in str(jax.make_jaxpr(lambda x: quant_matmul(x, w, "pallas", interpret=True))(x))
    assert "pallas_call" not in str(jax.make_jaxpr(lambda x: quant_matmul(x, w, "auto"))(x))
    dense = jnp.ones((256, 512))
    assert "pallas_call" not in str(jax.make_jaxpr(lambda x: quant_matmul(x, dense, "pallas"))(x))
    want = np.asarray(x, np.float64) @ np.asarray(dequantize_4bit(w, jnp.float32), np.float64).T
    assert _rel(jax.jit(lambda x, w: quant_matmul(x, w, "pallas", interpret=True))(x, w), want) <= REL


def test_config_knob_is_checked():
    config = ModelConfig.from_hf(SHARED / "model_configs" / "qwen2.5-3b-instruct.json", quant_matmul_impl="pallas")
    assert config.quant_matmul_impl == "pallas"
    with pytest.raises(ModelFileError, match="quant_matmul_impl"):
        ModelConfig.from_hf(SHARED / "model_configs" / "qwen2.5-3b-instruct.json", quant_matmul_impl="triton")


@pytest.mark.slow
def test_v5e_compile_writes_no_decoded_weight():
    """The kernels compile with Mosaic for v5e (4 chips, inside shard_map, forward + dx of a
    14336 x 4096 projection at 1024 tokens per chip): the optimized HLO has no float buffer of
    the weight's shape or a nibble half's, and the temporaries are below the XLA path's."""
    by_impl = compile_in_venv(".venv-tpu", "_nf4_kernel_compile_worker.py", "tpu:14336,4096",
                              require_env="QLORA_REQUIRE_TPU_COMPILE", missing="the TPU compiler is not installed",
                              ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    pallas, xla = by_impl["pallas"], by_impl["xla"]
    assert pallas["platform"] == "tpu"
    assert pallas["custom_calls"] == 2, pallas  # the forward and the backward kernel
    assert pallas["weight_buffers"] == [], pallas["weight_buffers"]
    assert pallas["arguments"] == xla["arguments"]
    assert pallas["temporaries"] < xla["temporaries"], (pallas["temporaries"], xla["temporaries"])
    # What remains: x's even/odd halves, the f32 scales, the f32 dx halves; under 16 MiB per chip.
    assert pallas["temporaries"] < 16 * 2**20, pallas["temporaries"]


@pytest.mark.slow  # ~50 s of CPU: ten kernel shapes through Pallas' interpreter, remat'd
def test_model_with_the_kernel_matches_xla():
    """A 2-layer model whose seven projections all take the kernel (hidden 256, MLP 512, k/v 128
    wide), scanned and remat'd: logits and LoRA gradients equal the XLA path's to float32 rounding."""
    hf = {"model_type": "llama", "vocab_size": 64, "hidden_size": 256, "intermediate_size": 512,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64}
    lora = LoraConfig(r=4, alpha=8.0, targets="all-linear", init="gaussian")
    ids = jax.random.randint(jax.random.key(3), (2, 8), 0, 64)
    results = {}
    for impl in ("xla", "pallas"):
        config = ModelConfig.from_hf(hf, quant_matmul_impl=impl, remat_policy="full")
        model = CausalLM(config, lora=lora, quant=QuantConfig(), dtype=jnp.float32, param_dtype=jnp.float32,
                         rngs=nnx.Rngs(0))
        for _, v in nnx.iter_graph(model):  # nonzero B, so that every adapter gets a gradient
            if isinstance(v, LoRAParam) and v.get_value().ndim == 3 and v.get_value().shape[-1] == 4:
                v.set_value(jnp.full(v.get_value().shape, 0.01, v.get_value().dtype))

        @nnx.jit
        def logits_and_grads(model):
            loss = lambda m: jnp.mean(m(ids) ** 2)
            return model(ids), nnx.grad(loss, argnums=nnx.DiffState(0, LoRAParam))(model)

        results[impl] = logits_and_grads(model)
    (lx, gx), (lp, gp) = results["xla"], results["pallas"]
    chex.assert_shape(lp, (2, 8, 64))
    assert _rel(lp, lx) <= 4 * REL, _rel(lp, lx)
    leaves_x, leaves_p = jax.tree.leaves(gx), jax.tree.leaves(gp)
    assert len(leaves_x) == len(leaves_p) >= 14
    for a, b in zip(leaves_x, leaves_p):
        assert np.abs(np.asarray(a)).max() > 0
        assert _rel(b, a) <= 1e-5, _rel(b, a)


@pytest.mark.slow
def test_h100_compile_writes_no_decoded_weight():
    """The Triton kernels compile for H100 (8 devices, inside shard_map, forward + dx of a
    14336 x 4096 projection at 1024 tokens per device): no float buffer of the weight's shape or a
    nibble half's, and fewer temporaries than the XLA path."""
    by_impl = compile_in_venv(".venv-cuda", "_nf4_kernel_compile_worker.py", "gpu:14336,4096",
                              require_env="QLORA_REQUIRE_GPU_COMPILE", missing="the CUDA compiler is not installed")
    pallas, xla = by_impl["pallas"], by_impl["xla"]
    assert pallas["platform"] == "gpu"
    assert pallas["custom_calls"] == 2, pallas
    assert pallas["weight_buffers"] == [], pallas["weight_buffers"]
    assert pallas["arguments"] == xla["arguments"]
    assert pallas["temporaries"] < xla["temporaries"], (pallas["temporaries"], xla["temporaries"])
