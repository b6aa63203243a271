"""Building blocks of the decoder: the QLoRA linear, RMSNorm, embeddings, rotary embeddings,
attention masks and attention.

Variable types (the whole parameter tree is made of these three plus ``LoRAParam``):

* :class:`BaseParam`: a frozen float weight kept in ``param_dtype`` (embeddings, norms, lm_head,
  biases, and decoder linears when quantization is off).
* :class:`QuantParam`: a frozen decoder linear stored as a :class:`~qlora_jax.quant.Quant4bit`
  (uint8 ``packed`` codes, ``absmax``, ``nested_absmax``, ``offset``).
* :class:`~qlora_jax.lora.LoRAParam`: the trainable adapters.

Memory contract of the frozen matmul: the backward pass re-materializes the weight from what is
stored (dequantizing NF4, or casting a dense weight to the compute dtype) instead of saving the
``[out, in]`` float weight as a residual. With quantization this is what keeps QLoRA's training
memory at the size of the 4-bit model. DoRA's weight norm (:func:`dora_weight_norm`) is computed
from the stored weight too, detached: it adds one ``[out]`` residual per linear.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qlora_jax import lora as lora_lib
from qlora_jax.kernels import nf4_matmul as nf4_kernel
from qlora_jax.models import attention_kernels
from qlora_jax.models.config import ModelConfig, QuantConfig
from qlora_jax.quant import Quant4bit, dequantize_4bit, dequantize_4bit_halves, quantize_4bit
from qlora_jax.quant.nf4 import row_layout

INIT_STD = 0.02  # transformers' initializer_range for these families; used for random init only


# quantize_4bit compiled once per weight shape (eagerly it would dispatch op by op).
quantize_jit = jax.jit(quantize_4bit, static_argnames=("quant_type", "blocksize", "double_quant"))


# ---------------------------------------------------------------------------------------------
# Activation sharding inside the training step.

_ACTIVATION_MESH: contextvars.ContextVar = contextvars.ContextVar("qlora_activation_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Any):
    """While tracing under this context, :func:`shard_activation` pins activations' batch dim to the
    mesh's ("data", "fsdp") axes. The trainer's step traces its body under it: without the pin,
    XLA's partitioner may keep a weight sharded on its contracting (hidden) dim over fsdp and
    instead gather the whole batch's activations onto every device and all-reduce the matmul's
    output, so every chip holds (and, under remat, saves) the global batch's activations."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def shard_activation(x: jax.Array, feature_axis: str | None = None) -> jax.Array:
    """``x [batch, ..., features]``: batch over ("data", "fsdp"), the last dim over
    ``feature_axis`` (e.g. "tensor" for the MLP's hidden units) when it divides; a no-op outside
    :func:`activation_sharding` or when the batch does not divide."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None:
        return x
    sizes = dict(mesh.shape)
    if sizes.get("data", 1) * sizes.get("fsdp", 1) == 1 and (feature_axis is None or sizes.get(feature_axis, 1) == 1):
        return x
    batch = ("data", "fsdp") if batch_shards(x.shape[0]) > 1 else None
    last = feature_axis if feature_axis and sizes.get(feature_axis, 1) > 1 and x.shape[-1] % sizes[feature_axis] == 0 else None
    spec = jax.sharding.PartitionSpec(batch, *([None] * (x.ndim - 2)), last)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


def batch_shards(rows: int) -> int:
    """How many ("data", "fsdp") shards :func:`shard_activation` splits ``rows`` batch rows into
    under :func:`activation_sharding`: their product when it is > 1 and divides ``rows``, else 1."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None:
        return 1
    sizes = dict(mesh.shape)
    n = sizes.get("data", 1) * sizes.get("fsdp", 1)
    return n if n > 1 and rows % n == 0 else 1


def activation_mesh() -> Any:
    """The mesh of the enclosing :func:`activation_sharding`, else None."""
    return _ACTIVATION_MESH.get()


class BaseParam(nnx.Variable):
    """A frozen, unquantized base-model weight (never updated by the optimizer)."""


class QuantParam(nnx.Variable):
    """A frozen base-model weight stored 4-bit; its value is a ``Quant4bit`` pytree."""


# ---------------------------------------------------------------------------------------------
# Frozen matmul: x @ W^T with W recomputed (not saved) for the backward pass.

def materialize_weight(w: jax.Array | Quant4bit, dtype: Any) -> jax.Array:
    """The ``[out, in]`` weight in ``dtype``, from either a dense array or a ``Quant4bit``."""
    if isinstance(w, Quant4bit):
        return dequantize_4bit(w, dtype)
    return w.astype(dtype)


def _decode_in_matmul(w: Any, dtype: Any) -> bool:
    """Whether the matmul decodes the 4-bit weight inside itself (the low-precision path).

    float32 compute (the CPU path, the reference) decodes the whole ``[out, in]`` weight with the
    byte-pair table, measured fastest on XLA's CPU backend. Low-precision compute (bf16/f16, the
    accelerator path) decodes the two nibble halves elementwise so that XLA fuses the decode into
    the matmul: on TPU the table gather's ``[n, 2]`` output is padded to 128 lanes in memory
    (64x the weight in float32: 14 GiB for one 14336 x 4096 matrix).
    """
    return (isinstance(w, Quant4bit) and jnp.dtype(dtype) != jnp.float32
            and row_layout(w.shape, w.blocksize))


def _split_matmul(x: jax.Array, w: Quant4bit) -> jax.Array:
    """``x @ W^T`` as ``x[..., 0::2] @ hi^T + x[..., 1::2] @ lo^T`` (f32 accumulation)."""
    hi, lo = dequantize_4bit_halves(w, x.dtype)
    y = (jnp.einsum("...i,oi->...o", x[..., 0::2], hi, preferred_element_type=jnp.float32)
         + jnp.einsum("...i,oi->...o", x[..., 1::2], lo, preferred_element_type=jnp.float32))
    return y.astype(x.dtype)


def _split_matmul_t(g: jax.Array, w: Quant4bit) -> jax.Array:
    """``g @ W``: the even and odd input columns, interleaved back to ``[..., in]``."""
    hi, lo = dequantize_4bit_halves(w, g.dtype)
    even = jnp.einsum("...o,oi->...i", g, hi)
    odd = jnp.einsum("...o,oi->...i", g, lo)
    return jnp.stack([even, odd], axis=-1).reshape(g.shape[:-1] + (-1,))


@jax.custom_vjp
def frozen_matmul(x: jax.Array, w: jax.Array | Quant4bit) -> jax.Array:
    """``x [..., in] @ W^T -> [..., out]`` in ``x.dtype``, where ``W [out, in]`` is frozen.

    The custom VJP returns no gradient for ``W`` and saves only ``W`` as stored (4-bit codes and
    statistics, or the parameter array itself) for the backward pass, which materializes it
    again to compute ``dx = g @ W``. Without it, autodiff would keep the dequantized (or cast)
    float ``[out, in]`` weight of every layer alive from the forward to the backward pass.
    """
    if _decode_in_matmul(w, x.dtype):
        return _split_matmul(x, w)
    return jnp.einsum("...i,oi->...o", x, materialize_weight(w, x.dtype))


def _frozen_matmul_fwd(x, w):
    return frozen_matmul(x, w), w


def _frozen_matmul_bwd(w, g):
    if _decode_in_matmul(w, g.dtype):
        return _split_matmul_t(g, w), None
    dx = jnp.einsum("...o,oi->...i", g, materialize_weight(w, g.dtype))
    return dx, None  # None: the frozen weight gets a zero cotangent


frozen_matmul.defvjp(_frozen_matmul_fwd, _frozen_matmul_bwd)


def quant_matmul(x: jax.Array, w: jax.Array | Quant4bit, impl: str = "xla", *,
                 interpret: bool = False) -> jax.Array:
    """:func:`frozen_matmul`, or the Pallas kernel (``qlora_jax.kernels.nf4_matmul``) when ``impl``
    selects it: the one place the 4-bit matmul is chosen (``ModelConfig.quant_matmul_impl``).

    ``impl`` "xla": always the XLA path. "pallas": the kernel of the target platform (the training
    mesh's, else the default backend; Mosaic on TPU, Triton on GPU) for every 4-bit weight it
    covers (``nf4_kernel.supports`` / ``supports_gpu``), the XLA path for the rest (dense weights,
    odd shapes, the flat layout). "auto": "pallas" on TPU, else "xla" (the GPU kernel is not
    measured yet). On CPU, or with ``interpret``, the TPU kernel runs in Pallas' interpreter (slow:
    tests). Under :func:`activation_sharding` with more than one device the kernel runs in
    ``shard_map`` (Pallas calls are not partitioned automatically): rows over ("data", "fsdp"),
    the weight gathered whole on every device; a mesh with a "tensor" axis > 1, or rows that do
    not divide, take the XLA path.
    """
    platform = _target_platform()
    if impl == "auto":
        impl = "pallas" if platform == "tpu" else "xla"
    backend = "gpu" if platform == "gpu" else "tpu"
    covered = nf4_kernel.supports_gpu(w) if backend == "gpu" else nf4_kernel.supports(w)
    if impl != "pallas" or not covered:
        return frozen_matmul(x, w)
    interpret = interpret or platform not in ("tpu", "gpu")

    def kernel(x, w):
        return nf4_kernel.nf4_matmul(x, w, interpret, backend)
    mesh = _ACTIVATION_MESH.get()
    if mesh is None or mesh.size == 1:
        return kernel(x, w)
    sizes = dict(mesh.shape)
    rows = sizes.get("data", 1) * sizes.get("fsdp", 1)
    if any(n > 1 for axis, n in sizes.items() if axis not in ("data", "fsdp")) or x.shape[0] % rows:
        return frozen_matmul(x, w)
    spec = jax.sharding.PartitionSpec(tuple(a for a in ("data", "fsdp") if a in sizes))
    return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, jax.sharding.PartitionSpec()),
                         out_specs=spec, check_vma=False)(x, w)


@jax.custom_vjp
def lora_matmul(x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """The adapter's output ``(x A^T) B^T * scale``: ``x [..., in]``, ``a [r, in]``, ``b [out, r]``.

    The custom VJP writes the backward pass as the four matmuls it is, each with its operands
    in their stored row-major layouts: the weight gradients contract over tokens as
    ``[r, T] @ [T, out]``, so only the thin ``[T, r]`` factor is transposed and the ``[T, out]``
    output gradient is read in place. Left to autodiff, XLA's CPU backend transposes that big
    gradient for the ``dB`` matmul and fuses the transpose into the elementwise ops producing it
    (the SiLU backward in the MLP), a write pattern measured at up to ~20% of a SmolLM2 step.
    ``scale`` (``alpha/r`` times an optional 0/1 layer gate) gets no gradient.
    """
    return jnp.einsum("...r,or->...o", jnp.einsum("...i,ri->...r", x, a), b) * scale


def _lora_matmul_fwd(x, a, b, scale):
    xa = jnp.einsum("...i,ri->...r", x, a)
    return jnp.einsum("...r,or->...o", xa, b) * scale, (x, xa, a, b, scale)


def _lora_matmul_bwd(res, g):
    x, xa, a, b, scale = res
    x2 = x.reshape(-1, x.shape[-1])
    g2 = g.reshape(-1, g.shape[-1])
    xa_s = xa.reshape(-1, xa.shape[-1]) * scale          # [T, r]
    g_xa = jnp.einsum("to,or->tr", g2, b) * scale         # [T, r]: gradient of x A^T
    db = jnp.einsum("tr,to->ro", xa_s, g2).T              # [r, out] -> [out, r]
    da = jnp.einsum("tr,ti->ri", g_xa, x2)                # [r, in]
    dx = jnp.einsum("tr,ri->ti", g_xa, a).reshape(x.shape)
    return dx, da, db, jnp.zeros_like(scale)


lora_matmul.defvjp(_lora_matmul_fwd, _lora_matmul_bwd)


def _row_sq_norm(w: jax.Array | Quant4bit, dtype: Any) -> jax.Array:
    """``sum_i W[o, i]^2`` [out] in float32, decoding a 4-bit weight as the matmul does."""
    if _decode_in_matmul(w, dtype):  # elementwise decode: XLA fuses it into the reduction
        hi, lo = dequantize_4bit_halves(w, jnp.float32)
        return jnp.sum(hi * hi, axis=-1) + jnp.sum(lo * lo, axis=-1)
    wf = materialize_weight(w, jnp.float32)
    return jnp.sum(wf * wf, axis=-1)


def dora_weight_norm(w: jax.Array | Quant4bit, a: jax.Array, b: jax.Array, scale: float,
                     dtype: Any = jnp.float32) -> jax.Array:
    """DoRA's ``||W + s B A||`` over the input dim, one per output row: ``[out]`` float32, no gradient.

    Expanded per row ``o`` as ``||W_o||^2 + 2 s B_o . (W A^T)_o + s^2 B_o (A A^T) B_o^T``: the
    weight enters only through its row square-sums and the thin ``A W^T`` [r, out] (the frozen
    matmul, which decodes NF4 inside itself), so neither ``W + s B A`` nor ``B A`` is ever formed
    as an ``[out, in]`` array. Everything is under ``stop_gradient`` (PEFT detaches the norm), so
    the backward pass keeps nothing of it but the ``[out]`` result.
    """
    a, b = jax.lax.stop_gradient(a), jax.lax.stop_gradient(b)
    hi = jax.lax.Precision.HIGHEST
    aw = frozen_matmul(a.astype(dtype), w).astype(jnp.float32)       # [r, out] = A W^T
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    cross = jnp.einsum("or,ro->o", b32, aw, precision=hi)           # B_o . (W A^T)_o
    gram = jnp.einsum("ri,si->rs", a32, a32, precision=hi)          # A A^T [r, r]
    ba_sq = jnp.einsum("or,rs,os->o", b32, gram, b32, precision=hi)  # ||(B A)_o||^2
    sq = _row_sq_norm(w, dtype) + 2.0 * scale * cross + scale * scale * ba_sq
    return jax.lax.stop_gradient(jnp.sqrt(jnp.maximum(sq, 0.0)))


@functools.partial(jax.jit, static_argnames=("scale", "stacked"))
def _initial_magnitude(w: Any, a: jax.Array, b: jax.Array, *, scale: float, stacked: bool) -> jax.Array:
    """:func:`dora_weight_norm` in float32, compiled once per shape. Stacked arrays are done one
    layer at a time (``lax.map``): the float32 decode is then one layer's, never the stack's."""
    if stacked:
        return jax.lax.map(lambda wab: dora_weight_norm(*wab, scale), (w, a, b))
    return dora_weight_norm(w, a, b, scale)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def _normal_init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return (INIT_STD * jax.random.normal(rngs.params(), shape)).astype(dtype)


def _take_layer(tree: Any, index: int | None) -> Any:
    return tree if index is None else jax.tree.map(lambda a: a[index], tree)


class QLoRALinear(nnx.Module):
    """``y = x W^T (+ b) + dropout(x) A^T B^T * s``: a frozen (optionally NF4) linear with LoRA.

    ``weight`` is HF ``[out, in]``: a ``QuantParam(Quant4bit)`` when ``quant`` is set, else a
    ``BaseParam`` array. ``lora_a`` [r, in] and ``lora_b`` [out, r] (PEFT's shapes) exist when
    ``lora`` is given, and with ``lora.use_dora`` the magnitude ``lora_magnitude`` [out] (DoRA,
    see ``qlora_jax.lora``). Inside a stacked (scanned) decoder every array gains a leading layer
    axis; ``index`` arguments of the inspection methods select one layer.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False,
                 quant: QuantConfig | None = None, lora: lora_lib.LoraConfig | None = None,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
                 matmul_impl: str = "xla"):
        self.in_features, self.out_features = in_features, out_features
        self.matmul_impl = matmul_impl  # the frozen matmul's implementation (see quant_matmul)
        self.dtype, self.param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
        self.lora_config = lora
        self.scale = lora.scale if lora is not None else 0.0
        w = _normal_init(rngs, (out_features, in_features), param_dtype)
        if quant is not None:
            self.weight = QuantParam(quantize_jit(w, quant_type=quant.quant_type, blocksize=quant.blocksize,
                                                  double_quant=quant.double_quant))
        else:
            self.weight = BaseParam(w)
        self.bias = BaseParam(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        if lora is not None:
            self.lora_a = lora_lib.LoRAParam(lora_lib.init_lora_a(rngs.params(), lora, in_features))
            self.lora_b = lora_lib.LoRAParam(lora_lib.init_lora_b(lora, out_features))
        else:
            self.lora_a = self.lora_b = None
        if lora is not None and lora.use_dora:
            self.lora_magnitude = lora_lib.LoRAParam(jnp.zeros((out_features,), lora.dtype))
            self.init_dora_magnitude()
        else:
            self.lora_magnitude = None

    @property
    def adapted(self) -> bool:
        return self.lora_a is not None

    def __call__(self, x: jax.Array, *, lora_enabled: bool = True, dropout_key: jax.Array | None = None,
                 lora_gate: jax.Array | None = None) -> jax.Array:
        """``x [..., in] -> [..., out]`` in the compute dtype.

        ``lora_enabled=False`` gives the base model's output. ``dropout_key`` turns on adapter
        dropout. ``lora_gate`` (a scalar, 0 or 1) multiplies the adapter's contribution; it marks
        layers of a stacked decoder whose copy of this linear is not targeted.
        """
        x = x.astype(self.dtype)
        w = self.weight.get_value()
        base = quant_matmul(x, w, self.matmul_impl)
        y = base
        if self.bias is not None:
            y = y + self.bias.get_value().astype(self.dtype)
        if not (self.adapted and lora_enabled):
            return y
        xd = _dropout(x, self.lora_config.dropout, dropout_key)
        a = self.lora_a.get_value().astype(self.dtype)  # [r, in]
        b = self.lora_b.get_value().astype(self.dtype)  # [out, r]
        if self.lora_magnitude is None:
            scale = jnp.asarray(self.scale, self.dtype)
            if lora_gate is not None:
                scale = scale * lora_gate.astype(self.dtype)
            return y + lora_matmul(xd, a, b, scale)
        # DoRA, as PEFT's DoraLinearLayer.forward: the bias-free base output rescaled per row;
        # with dropout the rescaled copy is of the dropped-out input (a second frozen matmul).
        norm = checkpoint_name(dora_weight_norm(w, a, b, self.scale, self.dtype), "dora_norm")  # [out]
        mag_scale = (self.lora_magnitude.get_value().astype(jnp.float32) / norm).astype(self.dtype)
        base_d = base if xd is x else quant_matmul(xd, w, self.matmul_impl)
        adapter = lora_matmul(xd, a, b, jnp.asarray(self.scale, self.dtype))
        delta = (mag_scale - 1) * base_d + mag_scale * adapter
        if lora_gate is not None:
            delta = delta * lora_gate.astype(self.dtype)
        return y + delta

    def init_dora_magnitude(self) -> None:
        """Set the DoRA magnitude to ``||W + s B A||`` per output row (``||W||`` at B = 0), as PEFT
        initialises ``lora_magnitude_vector``; per layer when the arrays are stacked."""
        a, b = self.lora_a.get_value(), self.lora_b.get_value()
        norm = _initial_magnitude(self.weight.get_value(), a, b, scale=self.scale, stacked=a.ndim == 3)
        self.lora_magnitude.set_value(norm.astype(self.lora_config.dtype))

    # Inspection (host-side, float32 numpy): used by merging and export.
    def base_weight(self, index: int | None = None) -> np.ndarray:
        """The frozen ``[out, in]`` weight of one layer (dequantized if 4-bit), float32."""
        return np.asarray(materialize_weight(_take_layer(self.weight.get_value(), index), jnp.float32))

    def bias_value(self, index: int | None = None) -> np.ndarray | None:
        if self.bias is None:
            return None
        return np.asarray(_take_layer(self.bias.get_value(), index), np.float32)

    def lora_weights(self, index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(lora_a [r, in], lora_b [out, r])`` of one layer, float32."""
        if not self.adapted:
            raise ValueError("this linear has no LoRA adapter")
        return (np.asarray(_take_layer(self.lora_a.get_value(), index), np.float32),
                np.asarray(_take_layer(self.lora_b.get_value(), index), np.float32))

    def magnitude(self, index: int | None = None) -> np.ndarray | None:
        """DoRA's ``lora_magnitude`` [out] of one layer, float32 (None without DoRA)."""
        if self.lora_magnitude is None:
            return None
        return np.asarray(_take_layer(self.lora_magnitude.get_value(), index), np.float32)


class RMSNorm(nnx.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, normalized in float32 then cast back (as HF).

    ``plus_one`` (gemma): the stored weight is an offset, ``(1 + weight)`` multiplies the float32
    normalized ``x`` before the cast back (transformers' Gemma RMSNorm); it starts at zeros.
    """

    def __init__(self, dim: int, *, eps: float, param_dtype: Any = jnp.float32, plus_one: bool = False):
        self.eps = eps
        self.plus_one = plus_one
        self.weight = BaseParam((jnp.zeros if plus_one else jnp.ones)((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (normed * (1.0 + self.weight.get_value().astype(jnp.float32))).astype(x.dtype)
        return self.weight.get_value().astype(x.dtype) * normed.astype(x.dtype)


class Embedding(nnx.Module):
    """Token embedding table ``weight [vocab, hidden]``; also the output head when tied.

    ``scale`` (gemma: ``sqrt(hidden)``) multiplies the looked-up rows, as a compute-dtype number
    (so bf16 compute rounds it as transformers' bf16 models do); the head is never scaled.
    """

    def __init__(self, vocab_size: int, dim: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs,
                 scale: float | None = None):
        self.dtype = jnp.dtype(dtype)
        self.scale = scale
        self.weight = BaseParam(_normal_init(rngs, (vocab_size, dim), param_dtype))

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        x = jnp.take(self.weight.get_value(), input_ids, axis=0).astype(self.dtype)
        return x if self.scale is None else x * jnp.asarray(self.scale, self.dtype)


class LMHead(nnx.Module):
    """Untied output projection ``weight [vocab, hidden]`` (HF ``lm_head.weight``), frozen."""

    def __init__(self, vocab_size: int, dim: int, *, param_dtype: Any, rngs: nnx.Rngs):
        self.weight = BaseParam(_normal_init(rngs, (vocab_size, dim), param_dtype))


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)`` (gemma's logit soft-capping), in ``x``'s dtype; ``x`` when ``cap`` is None."""
    if cap is None:
        return x
    return (cap * jnp.tanh(x / cap)).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings.

def rope_inv_freq(config: ModelConfig, *, local: bool = False) -> np.ndarray:
    """Inverse frequencies ``[rotary_dim / 2]`` (float32), with the config's rope scaling applied.

    ``rotary_dim`` is ``head_dim`` except with a ``partial_rotary_factor`` (phi3), where the
    frequencies are those of a head of ``rotary_dim`` dims, as transformers computes them.

    Computed in float32 in the same order of operations as transformers, so that the angles, and
    therefore long-position logits, agree closely. ``local``: the sliding layers' rope
    (``config.rope_local_theta``, unscaled; gemma3) when the config has one.
    """
    dim = config.rotary_dim
    local = local and config.rope_local_theta is not None
    theta = config.rope_local_theta if local else config.rope_theta
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    scaling = None if local else config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate the band between.
    factor = np.float32(scaling.factor)
    lo, hi = np.float32(scaling.low_freq_factor), np.float32(scaling.high_freq_factor)
    old_len = np.float32(scaling.original_max_position_embeddings)
    low_freq_wavelen, high_freq_wavelen = old_len / lo, old_len / hi
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """``cos, sin [batch, seq, rotary_dim]`` for integer ``positions [batch, seq]`` (angles in f32)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [b, s, d/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [batch, seq, heads, head_dim]`` in HF's half-split layout (rotate_half).

    When ``cos`` / ``sin`` cover fewer dims than a head (partial rotary, phi3), only the first
    ``cos.shape[-1]`` dims of each head are rotated and the rest pass through, as transformers does.
    """
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return jnp.concatenate([apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]], axis=-1)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# ---------------------------------------------------------------------------------------------
# Packed sequences and attention.

def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Positions ``[batch, seq]`` that restart at 0 wherever the segment id changes.

    Segments must be contiguous; distinct sequences in a row need distinct ids (0 = padding).
    """
    seq = segment_ids.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), segment_ids.shape)
    previous = jnp.pad(segment_ids, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
    starts = jnp.where(segment_ids != previous, idx, 0)
    return idx - jax.lax.cummax(starts, axis=1)


def attention_mask(segment_ids: jax.Array | None, seq: int, *, sliding_window: int | None = None) -> jax.Array:
    """Boolean ``[batch or 1, 1, seq, seq]``: causal, and within one segment when packed.

    Padding (segment 0) attends only to earlier padding, so no row is fully masked (no NaNs) and
    no real token ever sees padding. ``sliding_window``: a query also sees only the last
    ``sliding_window`` keys, itself included (transformers: ``kv_idx > q_idx - sliding_window``).
    """
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    if sliding_window is not None:
        causal = causal & jnp.triu(jnp.ones((seq, seq), dtype=bool), k=1 - sliding_window)
    causal = causal[None, None]
    if segment_ids is None:
        return causal
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return causal & same


# Query rows per block of the blockwise causal attention; sequences up to this length take the
# dense path (the CPU bench's 256 tokens among them).
ATTENTION_BLOCK = 512


def _target_platform() -> str:
    """The platform the program is compiled for: the training step's mesh's (an ahead-of-time
    compile for a TPU or GPU target runs on a CPU host), else the default backend's."""
    mesh = _ACTIVATION_MESH.get()
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


@functools.cache
def _cudnn_found() -> bool:
    """Whether jax finds the cuDNN library (jax[cuda12] installs it; a compile-only CUDA venv may
    lack it, and "auto" then keeps the XLA path rather than fail)."""
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version

        check_cudnn_version()
        return True
    except Exception:  # noqa: BLE001 - RuntimeError("cuDNN not found"), ImportError, ...
        return False


def attention_kernel(impl: str, q: jax.Array, logits_soft_cap: float | None = None) -> str | None:
    """Which kernel replaces the masked attention: "splash", "cudnn" or None (the XLA path).

    ``impl`` is ``ModelConfig.attention_impl``: "auto" picks splash on TPU and cuDNN on GPU (the
    XLA path elsewhere: the CPU path stays the reference); "splash" and "cudnn" ask for one
    (splash runs in Pallas' interpreter off TPU). The XLA path is kept where the kernel cannot
    run: splash on several devices outside the training step (no mesh to ``shard_map`` over, e.g.
    evaluation), and cuDNN for float32, a head dim above 128 or not a multiple of 8, or a soft cap.
    """
    platform = _target_platform()
    if impl == "auto":
        impl = "splash" if platform == "tpu" else "cudnn" if platform == "gpu" and _cudnn_found() else "jax"
    if impl == "splash":
        if _ACTIVATION_MESH.get() is None and jax.device_count() > 1:
            return None
        return "splash"
    if impl == "cudnn":
        d = q.shape[-1]
        if q.dtype == jnp.float32 or d > 128 or d % 8 or logits_soft_cap is not None:
            return None
        if platform != "gpu":
            raise ValueError(f"attention_impl='cudnn' needs a GPU target, not {platform!r}")
        return "cudnn"
    return None


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, impl: str = "jax",
              causal: bool = False, scale: float | None = None,
              logits_soft_cap: float | None = None, use_kernel: bool = False,
              segment_ids: jax.Array | None = None, sliding_window: int | None = None) -> jax.Array:
    """Scaled dot-product attention with grouped KV heads.

    ``q [b, t, heads, d]``, ``k, v [b, s, kv_heads, d]``, ``mask`` boolean broadcastable to
    ``[b, heads, t, s]`` -> ``[b, t, heads, d]``. Scores and softmax in float32.

    ``causal=True`` says that ``mask`` is causal (``t == s``; segments and a sliding window may
    restrict it further): longer sequences then run blockwise (:func:`causal_blockwise_attention`),
    never building ``[b, heads, t, s]`` scores and skipping the blocks above the diagonal.
    ``scale``: the factor on ``q . k`` (default ``d ** -0.5``). ``logits_soft_cap`` (gemma2):
    scores become ``cap * tanh(scores / cap)`` before masking; it takes the einsum path
    (``jax.nn.dot_product_attention`` has no soft cap).

    ``use_kernel=True`` says that ``mask`` is ``attention_mask(segment_ids, t, sliding_window=...)``:
    an attention kernel (:func:`attention_kernel`) may then replace the masked path, computing
    the same mask itself and never building ``[b, heads, t, s]`` scores (``mask`` is unused).
    """
    kernel = attention_kernel(impl, q, logits_soft_cap) if use_kernel and causal and q.shape[1] == k.shape[1] else None
    if kernel is not None:
        kw = dict(scale=scale, sliding_window=sliding_window)
        if kernel == "splash":
            mesh = _ACTIVATION_MESH.get()
            return attention_kernels.splash_attention(q, k, v, segment_ids, mesh=mesh, logits_soft_cap=logits_soft_cap,
                                                      interpret=_target_platform() != "tpu", **kw)
        return attention_kernels.cudnn_attention(q, k, v, segment_ids, **kw)
    impl = impl if impl in ("jax", "einsum") else "jax"
    kw = dict(impl=impl, scale=scale, logits_soft_cap=logits_soft_cap)
    if causal and q.shape[1] == k.shape[1] and q.shape[1] > ATTENTION_BLOCK:
        return causal_blockwise_attention(q, k, v, mask, **kw)
    return _dense_attention(q, k, v, mask, **kw)


def causal_blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                               impl: str = "jax", block: int = ATTENTION_BLOCK, scale: float | None = None,
                               logits_soft_cap: float | None = None) -> jax.Array:
    """Causal attention one block of ``block`` query rows at a time, each over its key prefix.

    Query rows ``[i*block, (i+1)*block)`` can only see keys ``< (i+1)*block``, so block ``i``
    attends to that prefix alone: the fully masked blocks above the diagonal are never computed
    (``(n+1)/2n`` of the dense work for ``n`` blocks), and the largest scores are ``[b, heads,
    block, s]``. Each block is rematerialized in the backward pass (``jax.checkpoint``), so its
    probabilities live only while that block is processed. Equal to the dense path (masked keys
    get probability exactly 0 there) up to summation order.
    """
    t = q.shape[1]
    dense = jax.checkpoint(functools.partial(_dense_attention, impl=impl, scale=scale,
                                             logits_soft_cap=logits_soft_cap))
    outs = []
    for start in range(0, t, block):
        stop = min(t, start + block)
        outs.append(dense(q[:, start:stop], k[:, :stop], v[:, :stop], mask[..., start:stop, :stop]))
    return jnp.concatenate(outs, axis=1)


def _dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, impl: str,
                     scale: float | None = None, logits_soft_cap: float | None = None) -> jax.Array:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl == "jax" and logits_soft_cap is None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
    b, t, n, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, n // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    scores = soft_cap(scores, logits_soft_cap)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, n, d)
