"""The sparse mixture-of-experts block of Qwen3-MoE: router, experts, per-expert LoRA, aux loss.

Parameter tree of one layer's block (the decoder stacks a leading layer axis on each)::

    mlp.gate.weight                      BaseParam [E, hidden]  (the router; never quantized)
    mlp.experts.gate_up_proj.weight      QuantParam(Quant4bit) or BaseParam [E, 2 inter, hidden]
    mlp.experts.down_proj.weight         QuantParam(Quant4bit) or BaseParam [E, hidden, inter]
    mlp.experts.{gate_up,down}_proj.lora_a   LoRAParam [E, r, in]   (if in lora.target_parameters)
    mlp.experts.{gate_up,down}_proj.lora_b   LoRAParam [E, out, r]

transformers names the expert tensors ``mlp.experts.gate_up_proj`` (no ``.weight``):
:func:`hf_param_name` maps the tree path to it. A 4-bit expert tensor holds one ``Quant4bit``
per expert (arrays ``[E, ...]``, static ``shape`` the per-expert ``(out, in)``): each expert
matrix is quantized alone, so its bytes are those bitsandbytes gives that ``[out, in]`` matrix.

Routing, as transformers' ``Qwen3MoeTopKRouter``: ``logits = x W_r^T`` and the softmax in
float32 (here the logits too, at HIGHEST precision: on TPU a default-precision float32 matmul is
one bf16 pass, enough to flip a top-k choice), ``top_k`` probabilities, renormalized to sum to 1
when ``norm_topk_prob``. Each token's output is the probability-weighted sum of its experts'
``down(silu(gate) * up)``.

Compute: the ``T * k`` (token, expert) assignments are sorted by expert and each projection is
one grouped matmul, ``jax.lax.ragged_dot`` (rows of expert ``e`` times ``W_e^T``): ``T * k``
rows of work per projection, as a real sparse MoE does, instead of the ``T * E`` of a dense
dispatch that runs every expert on every token and masks (``E / k`` = 16x the expert FLOPs for
Qwen3-30B-A3B) or the ``[T, k, out, in]`` weights of a per-token gather. The frozen weight is
dequantized once per layer call (``[E, out, in]`` in the compute dtype, like the dense QLoRA
linear's ``[out, in]``) and, through a custom VJP, never saved for the backward pass, which
decodes it again. Per-expert LoRA uses the same grouping: ``(x A_e^T) B_e^T * s``. In the
training step (``layers.activation_sharding``) the sort and the grouped matmuls run per
("data", "fsdp") batch shard in ``shard_map``, on that shard's ``T / G * k`` assignments; a sort
over the flattened batch made XLA gather all ``T * k`` onto every chip. The router logits (and so
the load-balancing loss) still cover the whole batch.

LoRA matches peft's ``target_parameters`` (``ParamWrapper``) exactly: peft keeps one
``lora_A`` ``[r * E, in]`` and ``lora_B`` ``[out, r * E]`` per parameter and adds
``s * B_e A_e`` to expert ``e``'s weight with ``A_e = lora_A.reshape(E, r, in)[e]`` and
``B_e = lora_B.reshape(out, r, E)[:, :, e]`` (expert-major rows of A, rank-major columns of
B); :func:`to_peft` / :func:`from_peft` convert between the layouts. peft forbids dropout and
DoRA there, and so does ``LoraConfig``.

The auxiliary load-balancing loss is transformers' ``load_balancing_loss_func``
(:func:`load_balancing_loss`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qlora_jax import lora as lora_lib
from qlora_jax.errors import ModelFileError
from qlora_jax.lora import LoraTargetError
from qlora_jax.models import layers
from qlora_jax.models.config import ModelConfig, QuantConfig
from qlora_jax.quant import Quant4bit, dequantize_4bit, dequantize_4bit_halves, quantize_4bit
from qlora_jax.quant.nf4 import row_layout

EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # transformers' (and peft's) names under mlp.experts


def hf_param_name(name: str) -> str:
    """transformers' name of a tensor, from its tree-derived name: expert weights drop ``.weight``."""
    for p in EXPERT_PARAMS:
        suffix = f".mlp.experts.{p}.weight"
        if name.endswith(suffix):
            return name[: -len(".weight")]
    return name


_PER_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def fuse_expert_tensors(tensors: Iterable[tuple[str, Any]], num_experts: int,
                        to_numpy: Callable[[Any], np.ndarray] = np.asarray) -> Iterator[tuple[str, Any]]:
    """Checkpoints on the Hub (and transformers 5's ``save_pretrained``) store one tensor per expert,
    ``mlp.experts.{e}.{gate,up,down}_proj.weight``; yield the fused ``mlp.experts.gate_up_proj``
    ``[E, 2 inter, hidden]`` (gate rows first, as transformers' conversion) and ``down_proj``
    ``[E, hidden, inter]`` as soon as one layer's ``3 E`` tensors are in (host memory: one layer's
    experts at most). Other names pass through; a layer left incomplete is passed through as is
    (build_model then names the tensors it does not know). ``to_numpy``: the loader's host conversion."""
    pending: dict[str, dict[tuple[str, int], Any]] = {}
    for name, tensor in tensors:
        m = _PER_EXPERT.fullmatch(name)
        if m is None:
            yield name, tensor
            continue
        group = pending.setdefault(m.group(1), {})
        group[(m.group(3), int(m.group(2)))] = tensor
        if len(group) == 3 * num_experts and all((p, e) in group for p in ("gate_proj", "up_proj", "down_proj")
                                                 for e in range(num_experts)):
            del pending[m.group(1)]
            arr = {k: to_numpy(v) for k, v in group.items()}
            yield m.group(1) + ".gate_up_proj", np.stack(
                [np.concatenate([arr[("gate_proj", e)], arr[("up_proj", e)]]) for e in range(num_experts)])
            yield m.group(1) + ".down_proj", np.stack([arr[("down_proj", e)] for e in range(num_experts)])
    for prefix, group in pending.items():
        for (p, e), tensor in group.items():
            yield f"{prefix}.{e}.{p}.weight", tensor


def materialize_experts(w: jax.Array | Quant4bit, dtype: Any, chunk: int | None = None) -> jax.Array:
    """``[E, out, in]`` in ``dtype`` from a dense array or a per-expert ``Quant4bit``.

    float32 (the CPU path, the reference) decodes with the byte-pair table like
    ``layers.materialize_weight``. Lower precision (the accelerator path) decodes the two nibble
    halves elementwise (``dequantize_4bit_halves``: the same values) and interleaves them, which
    XLA fuses into one pass: the table gather's ``f32[n, 2]`` output is padded to 128 lanes on TPU,
    12 GiB per chip for Qwen3-30B-A3B's 16 local experts of one projection.

    ``chunk``: decode that many experts at a time (``jax.lax.map``; the same values), so a chip
    that decodes all ``E`` experts holds one chunk's intermediates, not ``E``'s (the decode's
    scales and halves: 768 MiB buffers at 128 experts in the v5e buffer assignment; chunks of 16
    took 0.5-0.6 GiB less per chip for Qwen3-30B-A3B).
    """
    if isinstance(w, Quant4bit):
        def one(q):
            if jnp.dtype(dtype) == jnp.float32:
                return dequantize_4bit(q, dtype)
            hi, lo = dequantize_4bit_halves(q, dtype)  # [out, in / 2] each
            return jnp.stack([hi, lo], axis=-1).reshape(hi.shape[:-1] + (-1,))
        num = w.packed.shape[0]
        if chunk and chunk < num and num % chunk == 0:
            return jax.lax.map(one, w, batch_size=chunk)
        return jax.vmap(one)(w)
    return w.astype(dtype)


# Host-side export (loading.iter_hf_tensors): compiled once per shape (eagerly, vmap dispatches op by op).
materialize_experts_jit = jax.jit(materialize_experts, static_argnames=("dtype",))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def frozen_grouped_matmul(x: jax.Array, w: jax.Array | Quant4bit, group_sizes: jax.Array,
                          chunk: int | None = None) -> jax.Array:
    """``x [M, in]`` (rows grouped by expert, ``group_sizes [E]``) times ``W_e^T`` -> ``[M, out]``.

    Like ``layers.frozen_matmul``: no gradient for the frozen ``W [E, out, in]``, and only ``W``
    as stored is saved for the backward pass (``dx = ragged_dot(g, W)``). ``chunk``: see
    :func:`materialize_experts`.
    """
    return jax.lax.ragged_dot(x, jnp.swapaxes(materialize_experts(w, x.dtype, chunk), 1, 2), group_sizes)


def _frozen_grouped_fwd(x, w, group_sizes, chunk):
    return frozen_grouped_matmul(x, w, group_sizes, chunk), (w, group_sizes)


def _frozen_grouped_bwd(chunk, res, g):
    w, group_sizes = res
    return jax.lax.ragged_dot(g, materialize_experts(w, g.dtype, chunk), group_sizes), None, None


frozen_grouped_matmul.defvjp(_frozen_grouped_fwd, _frozen_grouped_bwd)


class ExpertLinear(nnx.Module):
    """``E`` frozen linears ``[out, in]`` applied to rows grouped by expert, with per-expert LoRA."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, *, quant: QuantConfig | None,
                 lora: lora_lib.LoraConfig | None, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(dtype)
        self.scale = lora.scale if lora is not None else 0.0
        w = (layers.INIT_STD * jax.random.normal(rngs.params(), (num_experts, out_features, in_features))
             ).astype(param_dtype)
        if quant is not None:
            if not row_layout((out_features, in_features), quant.blocksize):
                raise ModelFileError(f"MoE experts need in-features ({in_features}) divisible by the quant "
                                     f"blocksize {quant.blocksize} (config keys hidden_size / moe_intermediate_size)")
            quantize = functools.partial(quantize_4bit, quant_type=quant.quant_type, blocksize=quant.blocksize,
                                         double_quant=quant.double_quant)
            self.weight = layers.QuantParam(jax.jit(jax.vmap(quantize))(w))
        else:
            self.weight = layers.BaseParam(w)
        if lora is not None:
            keys = jax.random.split(rngs.params(), num_experts)
            self.lora_a = lora_lib.LoRAParam(jax.vmap(lambda k: lora_lib.init_lora_a(k, lora, in_features))(keys))
            self.lora_b = lora_lib.LoRAParam(jnp.zeros((num_experts, out_features, lora.r), lora.dtype))
        else:
            self.lora_a = self.lora_b = None

    @property
    def adapted(self) -> bool:
        return self.lora_a is not None

    def __call__(self, x: jax.Array, group_sizes: jax.Array, *, lora_enabled: bool = True,
                 chunk: int | None = None) -> jax.Array:
        """``x [M, in]`` sorted by expert -> ``[M, out]`` in the compute dtype."""
        x = x.astype(self.dtype)
        y = frozen_grouped_matmul(x, self.weight.get_value(), group_sizes, chunk)
        if not (self.adapted and lora_enabled):
            return y
        a = self.lora_a.get_value().astype(self.dtype)  # [E, r, in]
        b = self.lora_b.get_value().astype(self.dtype)  # [E, out, r]
        xa = jax.lax.ragged_dot(x, jnp.swapaxes(a, 1, 2), group_sizes)  # [M, r]
        return y + jax.lax.ragged_dot(xa, jnp.swapaxes(b, 1, 2), group_sizes) * jnp.asarray(self.scale, self.dtype)


class Router(nnx.Module):
    """``mlp.gate``: ``weight [E, hidden]``, frozen and unquantized (bnb's Linear4bit skips it)."""

    def __init__(self, num_experts: int, hidden: int, *, param_dtype: Any, rngs: nnx.Rngs):
        self.weight = layers.BaseParam((layers.INIT_STD * jax.random.normal(
            rngs.params(), (num_experts, hidden))).astype(param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [T, hidden] -> logits [T, E]`` in float32."""
        return jnp.einsum("th,eh->te", x.astype(jnp.float32), self.weight.get_value().astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)


class Experts(nnx.Module):
    """``mlp.experts``: ``down(silu(gate) * up)`` per expert, gate | up fused in ``gate_up_proj``."""

    def __init__(self, config: ModelConfig, lora: dict[str, lora_lib.LoraConfig | None], quant, dtype,
                 param_dtype, rngs: nnx.Rngs):
        e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        kw = dict(quant=quant, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_up_proj = ExpertLinear(e, h, 2 * i, lora=lora["gate_up_proj"], **kw)
        self.down_proj = ExpertLinear(e, i, h, lora=lora["down_proj"], **kw)

    def __call__(self, x, group_sizes, *, lora_enabled: bool = True, chunk: int | None = None):
        gate_up = checkpoint_name(self.gate_up_proj(x, group_sizes, lora_enabled=lora_enabled, chunk=chunk),
                                  "gate_up_proj")
        gate, up = jnp.split(gate_up, 2, axis=-1)  # [T * k, inter] each; saved by remat "projections"
        return self.down_proj(jax.nn.silu(gate) * up, group_sizes, lora_enabled=lora_enabled, chunk=chunk)


def route(router_logits: jax.Array, top_k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
    """``(weights [T, k] float32, experts [T, k] int32)``: float32 softmax, top-k, optional renorm."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


def expert_lora(config: ModelConfig, lora: lora_lib.LoraConfig | None) -> dict[str, lora_lib.LoraConfig | None]:
    """Per expert parameter: the LoRA config when ``lora.target_parameters`` selects it (in every
    layer: a per-layer selection raises), else None."""
    out: dict[str, lora_lib.LoraConfig | None] = {p: None for p in EXPERT_PARAMS}
    if lora is None or not lora.target_parameters:
        return out
    n = config.num_hidden_layers
    for p in EXPERT_PARAMS:
        mask = lora.parameter_layer_mask(n, f"mlp.experts.{p}")
        if any(mask) and not all(mask):
            raise LoraTargetError(f"lora.target_parameters selects mlp.experts.{p} in some layers only; "
                                  f"per-layer expert adapters are not supported")
        out[p] = lora if all(mask) else None
    names = [f"layers.{i}.mlp.experts.{p}" for i in range(n) for p in EXPERT_PARAMS]
    unknown = [t for t in lora.target_parameters if not any(x == t or x.endswith("." + t) for x in names)]
    if unknown:
        raise LoraTargetError(f"lora.target_parameters: {', '.join(map(repr, unknown))} match no expert parameter "
                              f"(valid: 'mlp.experts.gate_up_proj', 'mlp.experts.down_proj')")
    return out


class SparseMoeBlock(nnx.Module):
    """Qwen3-MoE's ``mlp``: ``x [b, s, hidden] -> [b, s, hidden]``; the router logits of the
    last call are kept in ``router_logits`` (``nnx.Intermediate``, ``[b * s, E]`` float32) for
    the load-balancing loss (the decoder's scan collects them)."""

    def __init__(self, config: ModelConfig, lora: lora_lib.LoraConfig | None, quant: QuantConfig | None,
                 dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.num_experts = config.num_experts
        self.gate = Router(config.num_experts, config.hidden_size, param_dtype=param_dtype, rngs=rngs)
        self.experts = Experts(config, expert_lora(config, lora), quant, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array, *, lora_kw: dict[str, dict] | None = None) -> jax.Array:
        """``lora_kw``: the decoder's per-projection adapter kwargs; only ``lora_enabled`` applies here."""
        lora_enabled = all(kw.get("lora_enabled", True) for kw in (lora_kw or {}).values())
        b, s, h = x.shape
        tokens = x.reshape(b * s, h)
        logits = self.gate(tokens)  # [T, E] float32
        self.router_logits = nnx.Intermediate(logits)
        weights, experts = route(logits, self.top_k, self.norm_topk_prob)  # [T, k]
        groups = layers.batch_shards(b)
        if groups == 1:
            return _dispatch(self.experts, tokens, weights, experts, self.num_experts, lora_enabled).reshape(b, s, h)
        # Under the training mesh each ("data", "fsdp") shard sorts and computes its own tokens'
        # assignments: a sort over the whole batch would gather every shard's tokens onto every
        # chip. shard_map, not vmap: jax 0.10.2 batches ragged_dot only with the weights batched
        # too. The experts (4-bit codes, adapters) enter whole and each chip decodes all E, E / G
        # at a time (the share it decoded before; the partitioner then gathered them in bf16).
        # Gathering bf16 decoded outside the map measured worse per v5e chip for Qwen3-30B-A3B.
        mesh = layers.activation_mesh()
        rows = jax.sharding.PartitionSpec(tuple(a for a in ("data", "fsdp") if a in mesh.shape))
        graphdef, state = nnx.split(self.experts)
        chunk = self.num_experts // groups if self.num_experts % groups == 0 else None

        def local(state, tokens, weights, experts):
            return _dispatch(nnx.merge(graphdef, state), tokens, weights, experts, self.num_experts, lora_enabled,
                             chunk)
        y = jax.shard_map(local, mesh=mesh, in_specs=(jax.sharding.PartitionSpec(), rows, rows, rows),
                          out_specs=rows, check_vma=False)(state, tokens, weights, experts)
        return y.reshape(b, s, h)


def _dispatch(module: Experts, tokens: jax.Array, weights: jax.Array, experts: jax.Array, num_experts: int,
              lora_enabled: bool, chunk: int | None = None) -> jax.Array:
    """``tokens [T, h]``, their routing ``weights`` / ``experts [T, k]`` -> ``[T, h]``: the ``T * k``
    assignments sorted by expert, the grouped matmuls, the probability-weighted sum per token."""
    top_k = experts.shape[-1]
    flat = experts.reshape(-1)  # assignment j = token j // k, its (j % k)-th expert
    order = jnp.argsort(flat, stable=True)  # assignments grouped by expert
    token_of = order // top_k
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    y = module(tokens[token_of], group_sizes, lora_enabled=lora_enabled, chunk=chunk)  # [T * k, hidden]
    y = y * weights.reshape(-1)[order][:, None].astype(y.dtype)
    return jnp.zeros_like(y, shape=tokens.shape).at[token_of].add(y)


def load_balancing_loss(router_logits: jax.Array, top_k: int, attention_mask: jax.Array | None = None) -> jax.Array:
    """transformers' ``load_balancing_loss_func`` (Switch Transformer), float32 scalar.

    ``router_logits [L, T, E]`` (every layer's, ``T = batch * seq``), ``attention_mask
    [batch, seq]`` (1 = real token; padding rows are left out). With ``f_e`` the fraction of the
    top-k assignments (summed over layers and real tokens) that go to expert ``e`` and ``P_e``
    the mean router probability of ``e`` over the same rows: ``E * sum_e f_e * P_e`` -- the
    counts are not divided by ``k``, as in transformers.
    """
    num_layers, t, e = router_logits.shape
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # [L, T, E]
    _, selected = jax.lax.top_k(probs, top_k)  # [L, T, k]
    mask = (jnp.ones((t,), jnp.float32) if attention_mask is None
            else attention_mask.reshape(-1).astype(jnp.float32))
    counts = jnp.sum(jax.nn.one_hot(selected, e, dtype=jnp.float32) * mask[None, :, None, None], axis=(0, 1, 2))
    prob_sum = jnp.sum(probs * mask[None, :, None], axis=(0, 1))
    rows = num_layers * jnp.sum(mask)
    return e * jnp.sum((counts / rows) * (prob_sum / rows))


# -- PEFT layout --------------------------------------------------------------------------------

def to_peft(lora_a: np.ndarray, lora_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-expert ``a [E, r, in]``, ``b [E, out, r]`` -> peft's ``lora_A [r E, in]``, ``lora_B [out, r E]``."""
    e, r, i = lora_a.shape
    return lora_a.reshape(e * r, i), np.transpose(lora_b, (1, 2, 0)).reshape(lora_b.shape[1], r * e)


def from_peft(lora_a: np.ndarray, lora_b: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`to_peft`."""
    a = lora_a.reshape(num_experts, -1, lora_a.shape[-1])
    b = np.transpose(lora_b.reshape(lora_b.shape[0], -1, num_experts), (2, 0, 1))
    return a, b


def peft_keys(layer: int, adapted: tuple[str, ...]) -> dict[str, str]:
    """peft's module name of each adapted expert parameter of one layer.

    peft wraps the ``experts`` module once per targeted parameter, in ``target_parameters``
    order, each wrapper around the previous one: the first parameter's adapters sit under
    ``experts.base_layer``, the last one's under ``experts``. ``adapted`` is that order (we write
    the list in ``EXPERT_PARAMS`` order; a loaded adapter's config gives its own).
    """
    base = f"model.layers.{layer}.mlp.experts"
    depth = len(adapted)
    return {p: base + ".base_layer" * (depth - 1 - j) for j, p in enumerate(adapted)}


def adapted_params(model) -> tuple[str, ...]:
    """The expert parameters of ``model`` with adapters, in ``EXPERT_PARAMS`` order."""
    if not model.config.num_experts:
        return ()
    experts = model.layers.mlp.experts
    return tuple(p for p in EXPERT_PARAMS if getattr(experts, p).adapted)


def peft_expert_tensors(model, prefix: str = "base_model.model.") -> dict[str, np.ndarray]:
    """The expert adapters under peft's ``adapter_model.safetensors`` names, float32."""
    tensors = {}
    adapted = adapted_params(model)
    if not adapted:
        return tensors
    experts = model.layers.mlp.experts
    for layer in range(model.config.num_hidden_layers):
        for p, module in peft_keys(layer, adapted).items():
            linear = getattr(experts, p)
            a, b = (np.asarray(v.get_value()[layer], np.float32) for v in (linear.lora_a, linear.lora_b))
            tensors[f"{prefix}{module}.lora_A.weight"], tensors[f"{prefix}{module}.lora_B.weight"] = to_peft(a, b)
    return tensors


def merged_experts(weight: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray, scale: float) -> np.ndarray:
    """``W_e + s B_e A_e`` for every expert: ``[E, out, in]`` float32."""
    return (np.asarray(weight, np.float32)
            + np.float32(scale) * np.einsum("eor,eri->eoi", np.asarray(lora_b, np.float32),
                                            np.asarray(lora_a, np.float32)))
