"""Every parameter of the model, declared once: HF ``[out, in]`` shape, dtype role, logical axes.

``WEIGHTS`` is the declaration: one entry per weight of the model (the embedding, each decoder
layer's norms (four with gemma's sandwich norms), 7 projections (4 fused ones for Phi-3) and Qwen3's / Gemma 3's
``q_norm`` / ``k_norm``, the final norm, ``lm_head``),
giving its shape as ``ModelConfig`` attribute names, the logical name of each dimension and
whether it lives in the stacked (scanned) decoder. The arrays a weight is stored as follow from
its kind (``LEAVES``): a linear has a ``bias`` on its out axis, LoRA adapters ``lora_a [r, in]``
(``("rank", in)``) and ``lora_b [out, r]`` (``(out, "rank")``) as PEFT lays them out, DoRA's
``lora_magnitude [out]`` on the out axis (like the bias), and when
quantized the NF4 pieces of ``qlora_jax.quant.Quant4bit`` -- ``packed`` codes and ``absmax``
reuse the weight's ``(out, in)`` axes, ``nested_absmax`` is ``("blocks",)`` and ``offset`` a
scalar.

Derived from it:

* :func:`param_specs`: shape, dtype role and axes of every array of a given model
  (``ModelConfig.param_specs()``); ``ModelConfig.linear_shapes()`` reads the projections' shapes
  from it, and the models build their linears from ``linear_shapes()``.
* :func:`logical_axes`: the logical names of one stored array, looked up by its path
  (``"layers.mlp.up_proj.weight.packed"`` or ``"layers/mlp/up_proj/lora_a"``). A path the
  declaration does not know raises :class:`UndeclaredParamError`; nothing is replicated by
  default. ``qlora_jax.train.sharding`` maps the logical names to mesh axes (its
  ``LOGICAL_RULES``) for the sharding of a state and for placement at load time
  (``param_sharding_fn``).

Norms are declared replicated (``(None,)``): they are tiny and every shard needs all of them.

MoE (qwen3_moe, ``qlora_jax.models.moe``): the router ``layers.mlp.gate`` (kind ``ROUTER``,
unquantized, replicated) and the fused experts ``layers.mlp.experts.{gate_up,down}_proj``
(kind ``EXPERTS``, ``[E, out, in]``) replace the dense MLP. Every expert leaf keeps the leading
``"expert"`` axis (NF4 fields one set per expert; ``lora_a [E, r, in]``, ``lora_b [E, out, r]``),
which the sharding table maps to fsdp.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qlora_jax.lora import LoraConfig
    from qlora_jax.models.config import ModelConfig, QuantConfig

Axes = tuple[str | None, ...]

LINEAR, NORM, EMBEDDING = "linear", "norm", "embedding"
EXPERTS, ROUTER = "experts", "router"  # MoE (qwen3_moe): stacked per-expert linears [E, out, in]; the router [E, hidden]
QUANT_FIELDS = ("packed", "absmax", "nested_absmax", "offset")  # the arrays of a Quant4bit
NESTED_BLOCKSIZE = 256  # = qlora_jax.quant.codes.NESTED_BLOCKSIZE (not imported: that pulls in jax)


class UndeclaredParamError(KeyError):
    """A parameter path that ``qlora_jax.models.params.WEIGHTS`` does not declare."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclasses.dataclass(frozen=True)
class Weight:
    """One declared weight.

    ``shape``: the HF shape (``[out, in]`` for a linear or an embedding table, ``[dim]`` for a
    norm) as names of ``ModelConfig`` attributes. ``axes``: the logical name of each dimension
    (see ``qlora_jax.train.sharding.LOGICAL_RULES``). ``stacked``: one copy per decoder layer,
    stored with a leading layer axis. ``present``: whether a config has it.
    """

    shape: tuple[str, ...]
    axes: Axes
    kind: str  # LINEAR | NORM | EMBEDDING
    stacked: bool
    present: Callable[[ModelConfig], bool] = lambda config: True


def _proj(out: str, in_: str, axes: Axes, present: Callable[[ModelConfig], bool] = lambda config: True) -> Weight:
    return Weight((out, in_), axes, LINEAR, stacked=True, present=present)


def _unfused(config: ModelConfig) -> bool:  # q, k, v and gate, up as separate linears
    return not config.fused_projections


def _fused(config: ModelConfig) -> bool:  # phi3: qkv_proj and gate_up_proj
    return config.fused_projections


def _dense_mlp(config: ModelConfig) -> bool:  # an MLP block, not an MoE one
    return not config.num_experts


def _moe(config: ModelConfig) -> bool:  # qwen3_moe: every layer's MLP is a sparse MoE block
    return bool(config.num_experts)


def _norm(dim: str, *, stacked: bool, present: Callable[[ModelConfig], bool] = lambda c: True) -> Weight:
    return Weight((dim,), (None,), NORM, stacked, present)


# The declaration, keyed by module path in the model tree ("layers" is the stacked decoder), in
# transformers' order. Column-parallel q/k/v/gate/up ("heads"/"mlp" out), row-parallel o/down.
# Phi-3's fused qkv_proj / gate_up_proj carry the same out axes: FSDP shards their "embed" (in)
# dim like any linear. Under tensor parallelism their output is split over "tensor" in contiguous
# chunks that do not line up with the q | k | v (gate | up) boundaries; GSPMD then reshards the
# fused activation when the model slices it (a collective per layer of about the fused output's
# size, and its transpose in the backward pass): correct, but more traffic than separate linears.
WEIGHTS: dict[str, Weight] = {
    "embed_tokens": Weight(("vocab_size", "hidden_size"), ("vocab", "embed"), EMBEDDING, stacked=False),
    "layers.input_layernorm": _norm("hidden_size", stacked=True),
    "layers.self_attn.q_proj": _proj("q_size", "hidden_size", ("heads", "embed"), _unfused),
    "layers.self_attn.k_proj": _proj("kv_size", "hidden_size", ("heads", "embed"), _unfused),
    "layers.self_attn.v_proj": _proj("kv_size", "hidden_size", ("heads", "embed"), _unfused),
    "layers.self_attn.qkv_proj": _proj("qkv_size", "hidden_size", ("heads", "embed"), _fused),
    "layers.self_attn.o_proj": _proj("hidden_size", "q_size", ("embed", "heads")),
    "layers.self_attn.q_norm": _norm("head_dim", stacked=True, present=lambda c: c.qk_norm),
    "layers.self_attn.k_norm": _norm("head_dim", stacked=True, present=lambda c: c.qk_norm),
    "layers.post_attention_layernorm": _norm("hidden_size", stacked=True),
    # gemma: post_attention_layernorm norms the attention output, these two the MLP's input / output.
    "layers.pre_feedforward_layernorm": _norm("hidden_size", stacked=True, present=lambda c: c.sandwich_norms),
    "layers.post_feedforward_layernorm": _norm("hidden_size", stacked=True, present=lambda c: c.sandwich_norms),
    "layers.mlp.gate_proj": _proj("intermediate_size", "hidden_size", ("mlp", "embed"),
                                  lambda c: _unfused(c) and _dense_mlp(c)),
    "layers.mlp.up_proj": _proj("intermediate_size", "hidden_size", ("mlp", "embed"),
                                lambda c: _unfused(c) and _dense_mlp(c)),
    "layers.mlp.gate_up_proj": _proj("gate_up_size", "hidden_size", ("mlp", "embed"), _fused),
    "layers.mlp.down_proj": _proj("hidden_size", "intermediate_size", ("embed", "mlp"), _dense_mlp),
    # MoE (qlora_jax.models.moe): the router stays unquantized and replicated (tiny); the experts'
    # leading dim carries the logical "expert" axis (sharded over fsdp: whole experts per device).
    "layers.mlp.gate": Weight(("num_experts", "hidden_size"), (None, None), ROUTER, stacked=True, present=_moe),
    "layers.mlp.experts.gate_up_proj": Weight(("num_experts", "moe_gate_up_size", "hidden_size"),
                                              ("expert", "mlp", "embed"), EXPERTS, stacked=True, present=_moe),
    "layers.mlp.experts.down_proj": Weight(("num_experts", "hidden_size", "moe_intermediate_size"),
                                           ("expert", "embed", "mlp"), EXPERTS, stacked=True, present=_moe),
    "norm": _norm("hidden_size", stacked=False),
    "lm_head": Weight(("vocab_size", "hidden_size"), ("vocab", "embed"), EMBEDDING, stacked=False,
                      present=lambda c: not c.tie_word_embeddings),
}

# The arrays each kind of weight is stored as: leaf name -> logical axes, from the weight's axes.
# Dtype roles: "param" (param_dtype), "lora" (LoraConfig.dtype), "codes" (uint8), "absmax"
# (uint8 when double-quantized, else float32), "stats" (float32).
LEAVES: dict[str, dict[str, tuple[str, Callable[[Axes], Axes]]]] = {
    EMBEDDING: {"weight": ("param", lambda ax: ax)},
    NORM: {"weight": ("param", lambda ax: ax)},
    LINEAR: {
        "weight": ("param", lambda ax: ax),  # unquantized
        "weight.packed": ("codes", lambda ax: ax),
        "weight.absmax": ("absmax", lambda ax: ax),
        "weight.nested_absmax": ("stats", lambda ax: ("blocks",)),
        "weight.offset": ("stats", lambda ax: ()),
        "bias": ("param", lambda ax: ax[:1]),
        "lora_a": ("lora", lambda ax: ("rank", ax[1])),
        "lora_b": ("lora", lambda ax: (ax[0], "rank")),
        "lora_magnitude": ("lora", lambda ax: ax[:1]),  # DoRA
    },
    ROUTER: {"weight": ("param", lambda ax: ax)},
    EXPERTS: {  # ax = ("expert", out, in); each expert quantized alone, adapters per expert
        "weight": ("param", lambda ax: ax),
        "weight.packed": ("codes", lambda ax: ax),
        "weight.absmax": ("absmax", lambda ax: ax),
        "weight.nested_absmax": ("stats", lambda ax: (ax[0], "blocks")),
        "weight.offset": ("stats", lambda ax: ax[:1]),
        "lora_a": ("lora", lambda ax: (ax[0], "rank", ax[2])),
        "lora_b": ("lora", lambda ax: (ax[0], ax[1], "rank")),
    },
}

ROOTS = tuple(dict.fromkeys(path.split(".", 1)[0] for path in WEIGHTS))  # top-level model attributes


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One array of a model: per-layer ``shape``, ``dtype`` role, logical ``axes`` (one per dim)."""

    shape: tuple[int, ...]
    dtype: str  # role, see LEAVES; concrete dtype: resolve_dtype()
    axes: Axes
    stacked: bool  # stored with a leading layer axis

    def stored_shape(self, num_layers: int) -> tuple[int, ...]:
        return ((num_layers,) if self.stacked else ()) + self.shape

    def stored_axes(self, num_layers: int) -> Axes:
        return fit_axes(self.axes, len(self.stored_shape(num_layers)))


def resolve_dtype(role: str, *, param_dtype: Any, lora_dtype: Any = "float32", double_quant: bool = True) -> str:
    """The numpy dtype name of a dtype role (see ``LEAVES``)."""
    import numpy as np

    return np.dtype({"param": param_dtype, "lora": lora_dtype, "codes": np.uint8, "stats": np.float32,
                     "absmax": np.uint8 if double_quant else np.float32}[role]).name


def _quant_shapes(shape: tuple[int, int], quant: QuantConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer shapes of the Quant4bit fields of a weight (``qlora_jax.quant.quantize_4bit``)."""
    n = math.prod(shape)
    n_blocks = -(-n // quant.blocksize)
    if shape[-1] % quant.blocksize == 0:  # row layout: blocks never cross rows
        packed, absmax = shape[:-1] + (shape[-1] // 2,), shape[:-1] + (shape[-1] // quant.blocksize,)
    else:
        packed, absmax = ((n + 1) // 2,), (n_blocks,)
    nested = (-(-n_blocks // NESTED_BLOCKSIZE),) if quant.double_quant else (0,)
    return {"weight.packed": packed, "weight.absmax": absmax, "weight.nested_absmax": nested, "weight.offset": ()}


def param_specs(config: ModelConfig, *, quant: QuantConfig | None = None,
                lora: LoraConfig | None = None) -> dict[str, ParamSpec]:
    """Every array of ``CausalLM(config, quant=quant, lora=lora)``, keyed by dotted tree path.

    E.g. ``"layers.self_attn.q_proj.weight.packed"``, ``"layers.mlp.up_proj.lora_a"``,
    ``"norm.weight"``. Shapes are per layer (``stored_shape`` adds the layer axis). A projection
    has adapters when ``lora`` targets it in at least one layer (the model keeps a slot per layer).
    """
    n = config.num_hidden_layers
    specs: dict[str, ParamSpec] = {}
    for module, w in WEIGHTS.items():
        if not w.present(config):
            continue
        shape = tuple(getattr(config, dim) for dim in w.shape)
        leaf_shapes: dict[str, tuple[int, ...]] = {"weight": shape}
        if w.kind == LINEAR:
            proj = module.rsplit(".", 1)[-1]
            if quant is not None:
                leaf_shapes = _quant_shapes(shape, quant)
            if config.linear_has_bias(proj):
                leaf_shapes["bias"] = shape[:1]
            if lora is not None and any(lora.layer_mask(n, proj)):
                leaf_shapes["lora_a"] = (lora.r, shape[1])
                leaf_shapes["lora_b"] = (shape[0], lora.r)
                if lora.use_dora:
                    leaf_shapes["lora_magnitude"] = shape[:1]
        elif w.kind == EXPERTS:  # [E, out, in]: per-expert NF4 fields and adapters
            if quant is not None:
                leaf_shapes = {k: shape[:1] + v for k, v in _quant_shapes(shape[1:], quant).items()}
            if lora is not None and any(lora.parameter_layer_mask(n, module.split(".", 1)[1])):
                leaf_shapes["lora_a"] = (shape[0], lora.r, shape[2])
                leaf_shapes["lora_b"] = (shape[0], shape[1], lora.r)
        for leaf, leaf_shape in leaf_shapes.items():
            role, axes_of = LEAVES[w.kind][leaf]
            specs[f"{module}.{leaf}"] = ParamSpec(tuple(leaf_shape), role, axes_of(w.axes), w.stacked)
    return specs


def linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """HF ``[out, in]`` shape of each decoder-layer linear the config has, by projection name (from ``WEIGHTS``)."""
    return {module.rsplit(".", 1)[-1]: tuple(getattr(config, dim) for dim in w.shape)
            for module, w in WEIGHTS.items() if w.kind == LINEAR and w.present(config)}


def quantized_matrices(config: ModelConfig) -> dict[str, tuple[int, int, int]]:
    """Every matrix of one decoder layer that is stored 4-bit: name -> ``(copies, out, in)``; the
    linears once each, MoE experts ``num_experts`` times (each expert quantized alone)."""
    out = {name: (1, o, i) for name, (o, i) in linear_shapes(config).items()}
    for module, w in WEIGHTS.items():
        if w.kind == EXPERTS and w.present(config):
            e, o, i = (getattr(config, dim) for dim in w.shape)
            out[module.split(".", 1)[1]] = (e, o, i)
    return out


def fit_axes(axes: Axes, ndim: int) -> Axes:
    """Declared axes laid over an array of ``ndim`` dims, right-aligned.

    Extra leading dims (the stacked layer axis) are unsharded (``None``). With fewer dims than
    declared (the flat layout of NF4 codes / absmax when ``in`` is not a multiple of the
    blocksize) the last ``ndim`` names are kept -- so a stacked flat ``[layers, n]`` array carries
    the weight's ``(out, in)``, as the sharding did before the declaration existed.
    """
    axes = tuple(axes)
    if ndim < len(axes):
        return axes[len(axes) - ndim:]
    return (None,) * (ndim - len(axes)) + axes


def _split(path: str) -> list[str]:
    # "value": the key of an nnx Variable's payload in state pytrees.
    return [p for p in re.split(r"[./]", path) if p and p != "value"]


def is_param_path(path: str) -> bool:
    """Whether ``path`` starts at a model attribute (``embed_tokens``, ``layers``, ``norm``, ``lm_head``)."""
    parts = _split(path)
    return bool(parts) and parts[0] in ROOTS


def declared_axes(path: str) -> Axes:
    """The declared logical axes of one array (per layer), by its path in the model tree.

    ``path``: dotted or slashed, e.g. ``"layers.self_attn.q_proj.weight.packed"``,
    ``"layers/mlp/up_proj/lora_b"``, ``"embed_tokens/weight/value"``. Raises
    :class:`UndeclaredParamError` for anything ``WEIGHTS`` / ``LEAVES`` do not declare.
    """
    parts = _split(path)
    if len(parts) >= 3 and parts[-2] == "weight" and parts[-1] in QUANT_FIELDS:
        module, leaf = parts[:-2], "weight." + parts[-1]
    else:
        module, leaf = parts[:-1], (parts[-1] if parts else "")
    weight = WEIGHTS.get(".".join(module))
    if weight is None or leaf not in LEAVES[weight.kind]:
        raise UndeclaredParamError(
            f"parameter {path!r} has no declared shape/axes: declare it in qlora_jax/models/params.py "
            f"(WEIGHTS: {', '.join(WEIGHTS)})")
    return LEAVES[weight.kind][leaf][1](weight.axes)


def logical_axes(path: str, shape: tuple[int, ...]) -> Axes:
    """Logical names for each dim of the stored array at ``path`` (layer axis included)."""
    return fit_axes(declared_axes(path), len(shape))


# -- counts ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """Analytic parameter counts.

    ``total``: every parameter (base + adapters), tied embeddings counted once.
    ``trainable``: adapter parameters (DoRA's magnitudes included).
    ``total_4bit``: as bitsandbytes/PEFT report a 4-bit model: a packed 4-bit weight counts
    ``numel / 2`` (its uint8 elements); quantization statistics are not counted.
    """

    total: int
    trainable: int
    total_4bit: int

    @property
    def trainable_percent(self) -> float:
        """100 * trainable / total_4bit: the figure PEFT prints for a QLoRA model."""
        return 100.0 * self.trainable / self.total_4bit

    @property
    def trainable_percent_full(self) -> float:
        return 100.0 * self.trainable / self.total


def count_params(config: ModelConfig, lora: LoraConfig | None = None) -> ParamCounts:
    """Count parameters from the config alone (no weights), with every decoder linear 4-bit."""
    shapes = config.linear_shapes()
    h, n = config.hidden_size, config.num_hidden_layers
    linear_weights = n * sum(o * i for o, i in shapes.values())
    biases = n * sum(o for p, (o, _) in shapes.items() if config.linear_has_bias(p))
    norms = n * ((4 if config.sandwich_norms else 2) * h + (2 * config.head_dim if config.qk_norm else 0)) + h
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    adapters = 0
    if lora is not None:
        for path in lora.targeted_modules(n, config.projections):
            out_f, in_f = shapes[path.rsplit(".", 1)[-1]]
            adapters += lora.r * (in_f + out_f) + (out_f if lora.use_dora else 0)
    if config.num_experts:  # MoE: experts 4-bit like the linears, the router unquantized
        for module, w in WEIGHTS.items():
            if w.kind == EXPERTS:
                e, out_f, in_f = (getattr(config, dim) for dim in w.shape)
                linear_weights += n * e * out_f * in_f
                if lora is not None:
                    layers = sum(lora.parameter_layer_mask(n, module.split(".", 1)[1]))
                    adapters += layers * e * lora.r * (in_f + out_f)
        norms += n * config.num_experts * h
    unquantized = biases + norms + embeddings + adapters
    return ParamCounts(total=linear_weights + unquantized, trainable=adapters,
                       total_4bit=linear_weights // 2 + unquantized)
