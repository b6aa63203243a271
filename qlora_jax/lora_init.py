"""Adapter initialisations that move part of the base weight into the adapter: PiSSA and LoftQ.

Both start from the float weight ``W`` [out, in] of an adapted linear and choose ``A`` [r, in],
``B`` [out, r] and a new frozen base ``W_base`` so that ``W_base + s B A`` approximates ``W``:

* **PiSSA** (``lora.init="pissa"``; ``"pissa_niter_K"`` for a randomized SVD with ``K`` power
  iterations): ``W = U S V^T``, ``A = sqrt(S_r / s) V_r^T``, ``B = U_r sqrt(S_r / s)`` (peft's
  ``pissa_init``: it divides ``S_r`` by ``scaling``), ``W_base = W - s B A``. With quantization
  the *residual* is what gets stored in 4 bits (the PiSSA paper's QPiSSA): the principal part
  lives in float adapters, only the flatter residual loses precision.
* **LoftQ** (``lora.init="loftq"``, ``lora.loftq_iter`` rounds): alternate ``Q = quant(W - s B A)``
  and ``s B A = SVD_r(W - deq(Q))``, starting from ``B A = 0``; the stored base is ``Q`` itself.
  peft 0.21's ``loftq_init`` quantizes with bitsandbytes (NF4, blocksize 64, no double
  quantization) and ignores ``scaling`` (its ``B A`` is the residual, exact only when
  ``alpha == r``); here the quantizer is the model's own (``qlora_jax.quant``, bitsandbytes-exact,
  with the model's blocksize and double quantization), so the error that is minimised is the
  one of the weights actually stored, and ``s`` is divided out as PiSSA does. At ``alpha == r``
  and peft's quantizer settings the two are the same algorithm.

:class:`BaseInitializer` is the hook :func:`qlora_jax.models.loading.build_model` calls for every
tensor as it streams in, so only one float weight exists at a time; a model constructed directly
(random weights) keeps placeholder adapters (``B = 0``). Everything is deterministic given the
weights (the randomized SVD's key is derived from the tensor's name): rebuilding a run's base from
its source reproduces the residual its adapters were trained against.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.quant import Quant4bit, dequantize_4bit, quantize_4bit

_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
SVD_INITS = ("pissa", "pissa_niter_K", "loftq")  # the inits that rewrite the base (K: power iterations)


def changes_base(init: str) -> bool:
    """Whether ``init`` (a ``LoraConfig.init`` value) rewrites the frozen base weights."""
    return init in ("pissa", "loftq") or bool(_PISSA_NITER.fullmatch(init))


def pissa_niter(init: str) -> int | None:
    """K of ``"pissa_niter_K"``, None for exact PiSSA (or any other init)."""
    m = _PISSA_NITER.fullmatch(init)
    return int(m.group(1)) if m else None


def _split_scale(u: jax.Array, s: jax.Array, vh: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
    """``(A, B)`` with ``scale * B @ A = u diag(s) vh``: peft's ``sqrt(S / scaling)`` on both sides."""
    root = jnp.sqrt(s / scale)
    return root[:, None] * vh, u * root[None, :]


@functools.partial(jax.jit, static_argnames=("r",))
def _svd_top(w: jax.Array, r: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    u, s, vh = jnp.linalg.svd(w, full_matrices=False)
    return u[:, :r], s[:r], vh[:r]


@functools.partial(jax.jit, static_argnames=("r", "niter"))
def _svd_lowrank(w: jax.Array, key: jax.Array, r: int, niter: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Randomized rank-``r`` SVD (Halko et al., Alg. 4.4; torch's ``svd_lowrank`` with ``q = r``
    as peft calls it): a Gaussian sketch, ``niter`` orthonormalised power iterations."""
    q, _ = jnp.linalg.qr(w @ jax.random.normal(key, (w.shape[1], r), w.dtype))
    for _ in range(niter):
        q, _ = jnp.linalg.qr(w.T @ q)
        q, _ = jnp.linalg.qr(w @ q)
    u, s, vh = jnp.linalg.svd(q.T @ w, full_matrices=False)  # [r, in] -> exact small SVD
    return q @ u, s, vh


def pissa_factors(weight: Any, r: int, scale: float, *, niter: int | None = None,
                  key: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(residual [out, in], lora_a [r, in], lora_b [out, r])``, all float32.

    ``residual + scale * lora_b @ lora_a == weight`` up to float32 rounding; ``lora_b @ lora_a`` is
    the best rank-``r`` approximation of ``weight / scale`` (exact SVD when ``niter`` is None, else
    randomized with ``niter`` power iterations and ``key``).
    """
    key = jax.random.key(0) if key is None else key
    return _pissa(jnp.asarray(weight), key, r=r, scale=scale, niter=niter)


@functools.partial(jax.jit, static_argnames=("r", "scale", "niter"))
def _pissa(w, key, *, r, scale, niter):
    w = w.astype(jnp.float32)
    u, s, vh = _svd_top(w, r) if niter is None else _svd_lowrank(w, key, r, niter)
    a, b = _split_scale(u, s, vh, scale)
    return w - scale * (b @ a), a, b


def loftq_factors(weight: Any, r: int, scale: float, *, iters: int, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = True,
                  on_round: Callable[[int, Quant4bit, jax.Array, jax.Array], None] | None = None,
                  ) -> tuple[Quant4bit, jax.Array, jax.Array]:
    """``(q, lora_a [r, in], lora_b [out, r])``: LoftQ's alternating minimisation of
    ``||weight - (deq(q) + scale * B A)||_F`` over ``iters`` >= 1 rounds.

    Round 1 quantizes ``weight`` itself (plain QLoRA's base) and fits ``s B A`` to its quantization
    error by SVD; each further round re-quantizes ``weight - s B A`` and refits. ``on_round(i, q,
    a, b)`` sees every round's result (i = 1 ... iters).
    """
    if iters < 1:
        raise ValueError(f"loftq iters must be >= 1, got {iters}")
    w = jnp.asarray(weight, jnp.float32)
    a = b = None
    for i in range(1, iters + 1):
        q, a, b = _loftq_round(w, a, b, r=r, scale=scale, quant_type=quant_type, blocksize=blocksize,
                               double_quant=double_quant)
        if on_round is not None:
            on_round(i, q, a, b)
    return q, a, b


@functools.partial(jax.jit, static_argnames=("r", "scale", "quant_type", "blocksize", "double_quant"))
def _loftq_round(w, a, b, *, r, scale, quant_type, blocksize, double_quant):
    target = w if a is None else w - scale * (b @ a)
    q = quantize_4bit(target, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    u, s, vh = _svd_top(w - dequantize_4bit(q, jnp.float32), r)
    a, b = _split_scale(u, s, vh, scale)
    return q, a, b


_dequantize = jax.jit(dequantize_4bit, static_argnames=("dtype",))


class BaseInitializer:
    """The loader's per-tensor hook for ``lora.init`` in :data:`SVD_INITS`.

    ``build_model`` passes every tensor through :meth:`base_tensor` (returning it unchanged unless
    it is an adapted linear's weight, else its residual / LoftQ ``Quant4bit``) and, after
    ``init_adapters``, calls :meth:`write_adapters` to put the matching ``A``, ``B`` in place.
    Host memory: the adapters once more in float32 (``r * (in + out)`` per linear).
    """

    def __init__(self, model: nnx.Module, lora: Any):
        if lora.init == "loftq" and getattr(model, "quant_config", None) is None:
            raise ValueError("lora.init='loftq' needs a 4-bit base (quantize='nf4' or 'fp4'): "
                             "without quantization there is no error to fit")
        self.lora = lora
        self.masks = dict(model.lora_layer_mask)
        self.factors: dict[tuple[str, ...], dict[int, tuple[np.ndarray, np.ndarray]]] = {}

    def _adapted(self, path: tuple[str, ...], layer: int | None) -> bool:
        return (layer is not None and path[-1] == "weight" and len(path) >= 2
                and path[-2] in self.masks and self.masks[path[-2]][layer])

    def base_tensor(self, name: str, path: tuple[str, ...], layer: int | None, tensor: Any, abstract: Any) -> Any:
        """``tensor``, or for an adapted weight the base to store in its place (see module docstring).

        A pre-quantized tensor (a bitsandbytes checkpoint) is dequantized first: its decoded
        values stand in for the float original.
        """
        if not self._adapted(path, layer):
            return tensor
        if isinstance(tensor, Quant4bit):
            w = _dequantize(tensor, jnp.float32)
        elif hasattr(tensor, "detach"):  # a torch tensor
            w = jnp.asarray(tensor.detach().cpu().float().numpy())
        else:
            w = jnp.asarray(np.asarray(tensor), jnp.float32)
        lora = self.lora
        if lora.init == "loftq":
            base, a, b = loftq_factors(w, lora.r, lora.scale, iters=lora.loftq_iter, quant_type=abstract.quant_type,
                                       blocksize=abstract.blocksize, double_quant=abstract.absmax.dtype == jnp.uint8)
        else:
            key = jax.random.fold_in(jax.random.key(0), zlib.crc32(name.encode()))
            residual, a, b = pissa_factors(w, lora.r, lora.scale, niter=pissa_niter(lora.init), key=key)
            base = np.asarray(residual)  # quantized (or cast) by the loader like any float weight
        self.factors.setdefault(path[:-1], {})[layer] = (np.asarray(a), np.asarray(b))
        return base

    def write_adapters(self, model: nnx.Module) -> None:
        """Set ``lora_a`` / ``lora_b`` of every linear seen by :meth:`base_tensor` (in place)."""
        for path, var in nnx.iter_graph(model):
            path = tuple(str(p) for p in path)
            if not (isinstance(var, nnx.Variable) and path[-1] in ("lora_a", "lora_b") and path[:-1] in self.factors):
                continue
            value = np.array(var.get_value(), np.float32)
            for layer, (a, b) in self.factors[path[:-1]].items():
                value[layer] = a if path[-1] == "lora_a" else b
            var.set_value(jnp.asarray(value, var.get_value().dtype))


def quantization_error(weight: Any, base: Any, lora_a: Any = None, lora_b: Any = None, scale: float = 1.0) -> float:
    """``||W - (deq(base) + s B A)||_F`` in float64 (``base`` a ``Quant4bit`` or float array)."""
    w = np.asarray(weight, np.float64)
    approx = np.asarray(_dequantize(base, jnp.float32) if isinstance(base, Quant4bit) else base, np.float64)
    if lora_a is not None:
        approx = approx + scale * (np.asarray(lora_b, np.float64) @ np.asarray(lora_a, np.float64))
    return float(np.linalg.norm(w - approx))


__all__ = ["SVD_INITS", "BaseInitializer", "changes_base", "loftq_factors", "pissa_factors", "pissa_niter",
           "quantization_error"]
