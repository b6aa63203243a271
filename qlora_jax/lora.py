"""LoRA adapters: which linears get one, how they start, how they scale, how they merge.

An adapted linear computes ``y = x W^T + dropout(x) A^T B^T * s`` with ``A`` (``lora_a``) of shape
``[r, in]`` and ``B`` (``lora_b``) of shape ``[out, r]`` -- exactly PEFT's ``lora_A.weight`` and
``lora_B.weight`` -- and ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).

Adapters are held in their own variable type, :class:`LoRAParam`, which deliberately does *not*
subclass ``nnx.Param``: ``nnx.state(model, LoRAParam)`` (or :func:`trainable_state`) selects
exactly the trainable weights, for the optimizer, for gradients and for adapter checkpoints.

This module imports nothing from ``qlora_jax.models`` (the models import it); the functions that
walk a model use the model's ``iter_linears()``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.errors import UserError
from qlora_jax.lora_init import changes_base

# The seven linears of a LLaMA / Qwen decoder layer, in HF naming, and the block each lives in.
# Phi-3 has four (``ModelConfig.projections``): fused qkv_proj and gate_up_proj, o_proj, down_proj.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROJECTION_BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                    "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
                    "qkv_proj": "self_attn", "gate_up_proj": "mlp"}
ALL_LINEAR = "all-linear"  # shorthand for every decoder linear of the model (never lm_head, as in QLoRA)
LORA_INITS = ("peft", "gaussian", "pissa", "pissa_niter_K", "loftq")  # K: randomized-SVD power iterations


class LoraTargetError(UserError):
    """``lora.targets`` names a module the model does not have (the message lists valid names)."""


class LoRAParam(nnx.Variable):
    """A trainable adapter weight (``lora_a`` [r, in], ``lora_b`` [out, r], DoRA's ``lora_magnitude`` [out]).

    Not a subclass of ``nnx.Param``, so filtering on it never picks up a frozen base weight.
    """


# The filter that selects everything the optimizer updates.
TRAINABLE = LoRAParam
MAGNITUDE = "lora_magnitude"  # attribute name of DoRA's magnitude vector in an adapted linear


def module_path(layer: int, proj: str) -> str:
    """Path of a decoder linear that targets are matched against, e.g. "layers.3.self_attn.q_proj"."""
    return f"layers.{layer}.{PROJECTION_BLOCK[proj]}.{proj}"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Where adapters go and how they are initialised and scaled.

    ``targets``: a sequence of names, each matching a module whose path equals it or ends with
    ``"." + name`` (PEFT's rule: ``"q_proj"``, ``"self_attn.q_proj"``, ``"layers.3.mlp.up_proj"``);
    or one regex string, matched with ``re.fullmatch`` against the path
    ``"layers.{i}.{self_attn|mlp}.{proj}"`` or the same prefixed with ``"model."`` (PEFT's key),
    so a PEFT ``target_modules`` regex carries over; or ``"all-linear"`` for every decoder linear
    of the model (the seven projections; Phi-3's four: ``qkv_proj``, ``o_proj``, ``gate_up_proj``,
    ``down_proj``, peft's names). A target that selects nothing raises.
    """

    r: int = 8  # rank
    alpha: float = 16.0  # scale numerator: s = alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0  # dropout on the adapter's input only (the base path sees x as is)
    targets: tuple[str, ...] | str = ALL_LINEAR  # see class docstring
    init: str = "peft"  # "peft": A ~ U(+-1/sqrt(in)); "gaussian": A ~ N(0, init_std^2) (B = 0 for both);
    # "pissa" / "pissa_niter_K" / "loftq": from the base weight's SVD, base <- residual (qlora_jax.lora_init)
    init_std: float = 0.01  # std of A for init="gaussian"
    loftq_iter: int = 1  # alternating quantize / SVD rounds for init="loftq"
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    use_dora: bool = False  # DoRA: a trainable magnitude per output row (see the module docstring)
    dtype: str = "float32"  # storage dtype of A, B (and the DoRA magnitude)
    # MoE expert weights to adapt, peft's ``target_parameters`` (qwen3_moe: "mlp.experts.gate_up_proj",
    # "mlp.experts.down_proj"); a per-expert LoRA on every layer (qlora_jax.models.moe)
    target_parameters: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "target_parameters", tuple(str(t) for t in self.target_parameters))
        if self.target_parameters and (self.dropout or self.use_dora or changes_base(self.init)):
            raise ValueError("LoraConfig.target_parameters cannot be combined with dropout, use_dora or an "
                             "SVD init (peft's ParamWrapper rejects them too)")
        if isinstance(self.targets, (list, tuple)):
            object.__setattr__(self, "targets", tuple(str(t) for t in self.targets))
            if not self.targets:
                raise ValueError("LoraConfig.targets is empty")
        elif not isinstance(self.targets, str):
            raise TypeError(f"LoraConfig.targets must be a sequence of names or a regex string, "
                            f"got {type(self.targets).__name__}")
        if self.r <= 0:
            raise ValueError(f"LoraConfig.r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("peft", "gaussian") and not changes_base(self.init):
            raise ValueError(f"LoraConfig.init must be one of {LORA_INITS}, got {self.init!r}")
        if self.loftq_iter < 1:
            raise ValueError(f"LoraConfig.loftq_iter must be >= 1, got {self.loftq_iter}")
        if self.use_dora and changes_base(self.init):
            raise ValueError(f"LoraConfig.init={self.init!r} cannot be combined with use_dora")

    @property
    def scale(self) -> float:
        """s in ``x W^T + s x A^T B^T``."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def matches(self, path: str) -> bool:
        """Whether the linear at ``path`` ("layers.3.self_attn.q_proj") gets an adapter."""
        if self.targets == ALL_LINEAR:
            return path.rsplit(".", 1)[-1] in PROJECTION_BLOCK
        if isinstance(self.targets, str):
            return bool(re.fullmatch(self.targets, path) or re.fullmatch(self.targets, "model." + path))
        return any(path == t or path.endswith("." + t) for t in self.targets)

    def parameter_layer_mask(self, num_layers: int, name: str) -> tuple[bool, ...]:
        """For one MoE parameter (``name`` = "mlp.experts.gate_up_proj"), whether each layer's copy
        is adapted: a ``target_parameters`` entry equal to its path ``layers.{i}.{name}`` or a suffix of it."""
        return tuple(any(f"layers.{i}.{name}" == t or f"layers.{i}.{name}".endswith("." + t)
                         for t in self.target_parameters) for i in range(num_layers))

    def layer_mask(self, num_layers: int, proj: str) -> tuple[bool, ...]:
        """For one projection, whether each decoder layer's copy of it is adapted."""
        return tuple(self.matches(module_path(i, proj)) for i in range(num_layers))

    def targeted_modules(self, num_layers: int, projections: tuple[str, ...] = PROJECTIONS) -> list[str]:
        """Every adapted module path, in layer order, among a model's ``projections``
        (``ModelConfig.projections``; default: the seven of LLaMA).

        Raises :class:`LoraTargetError` if the targets select nothing, or if any one name of a
        target list selects nothing (a typo must not silently train fewer modules)."""
        paths = [module_path(i, p) for i in range(num_layers) for p in projections]
        example = module_path(0, projections[0]).split(".", 2)[-1]
        valid = (f"{ALL_LINEAR!r}, {', '.join(projections)}, or a path such as {example!r} or "
                 f"{module_path(0, projections[-2])!r} (layers 0-{num_layers - 1})")
        if isinstance(self.targets, tuple):
            unknown = [t for t in self.targets if not any(p == t or p.endswith("." + t) for p in paths)]
            if unknown:
                raise LoraTargetError(f"lora.targets: {', '.join(map(repr, unknown))} "
                                      f"match{'es' if len(unknown) == 1 else ''} no linear of the model; "
                                      f"valid names: {valid}")
        chosen = [p for p in paths if self.matches(p)]
        if not chosen:
            raise LoraTargetError(f"lora.targets={self.targets!r} matches no linear of the model; valid: {valid} "
                                  f"(a regex is matched against paths like {paths[0]!r})")
        return chosen


def init_lora_a(key: jax.Array, lora: LoraConfig, in_features: int) -> jax.Array:
    """``lora_a`` [r, in] at init.

    "peft": PEFT's default, ``kaiming_uniform_(a=sqrt(5))`` = U(-1/sqrt(in), 1/sqrt(in)).
    "gaussian": N(0, init_std^2) (std 0.01, as in the seed experiments); also the placeholder for
    "pissa" / "loftq", whose real values ``build_model`` computes from the float base weights
    (``qlora_jax.lora_init``).
    """
    shape = (lora.r, in_features)
    if lora.init == "peft":
        bound = 1.0 / math.sqrt(in_features)
        a = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    else:
        a = lora.init_std * jax.random.normal(key, shape, jnp.float32)
    return a.astype(lora.dtype)


def init_lora_b(lora: LoraConfig, out_features: int) -> jax.Array:
    """``lora_b`` [out, r] at init: zeros, so an adapted model starts equal to its base."""
    return jnp.zeros((out_features, lora.r), lora.dtype)


def init_adapters(model: nnx.Module, lora: LoraConfig, key: jax.Array) -> None:
    """(Re)initialize every adapter of ``model`` in place: ``lora_a`` per ``lora.init``, ``lora_b`` = 0,
    and a DoRA magnitude to the row norms of its (frozen, possibly 4-bit) base weight.

    Each ``lora_a`` gets a key folded from ``key`` and its own path in the tree (and split per
    layer of a stacked array), so the values depend only on the seed and the module's name: a
    model built directly and one built from a checkpoint start from the same adapters.
    """
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, LoRAParam):
            continue
        value = var.get_value()
        name = ".".join(str(p) for p in path)
        if path[-1] == "lora_b":
            var.set_value(jnp.zeros(value.shape, lora.dtype))
            continue
        if path[-1] == MAGNITUDE:
            continue  # set below, from the base weight
        lead, (r, in_features) = value.shape[:-2], value.shape[-2:]
        if r != lora.r:
            raise ValueError(f"{name} has rank {r}, LoraConfig.r is {lora.r}")
        keys = jax.random.split(jax.random.fold_in(key, zlib.crc32(name.encode())), math.prod(lead))
        a = jax.vmap(functools.partial(init_lora_a, lora=lora, in_features=in_features))(keys)
        var.set_value(a.reshape(value.shape))
    for _, node in nnx.iter_graph(model):  # DoRA linears (duck-typed: this module sees no models)
        if getattr(node, MAGNITUDE, None) is not None:
            node.init_dora_magnitude()


def trainable_state(model: nnx.Module) -> nnx.State:
    """The adapters of ``model`` (everything the optimizer updates)."""
    return nnx.state(model, LoRAParam)


def split_model(model: nnx.Module) -> tuple[Any, nnx.State, nnx.State]:
    """``(graphdef, adapters, frozen rest)``: what jit'd functions take instead of the model."""
    return nnx.split(model, LoRAParam, ...)


def merge_linear(weight: Any, lora_a: Any, lora_b: Any, scale: float, magnitude: Any = None) -> np.ndarray:
    """Dense merged weight ``W + s * B @ A`` [out, in] in float32 (numpy).

    With a DoRA ``magnitude`` [out]: ``(m / ||W + s B A||)[:, None] * (W + s B A)``, PEFT's merge."""
    w = np.asarray(weight, np.float32)
    delta = np.asarray(lora_b, np.float32) @ np.asarray(lora_a, np.float32)
    merged = w + np.float32(scale) * delta
    if magnitude is None:
        return merged
    norm = np.linalg.norm(merged, axis=1)
    return (np.asarray(magnitude, np.float32) / norm)[:, None] * merged


def merge_lora(model: nnx.Module) -> dict[str, np.ndarray]:
    """Merged float32 weights of every adapted linear, keyed by transformers name.

    E.g. ``{"model.layers.0.self_attn.q_proj.weight": W + s B A, ...}``; a quantized base weight is
    dequantized first. Linears without an adapter are not included; for a complete merged state
    dict use ``qlora_jax.models.iter_hf_tensors(model, merge_lora=True)``.
    """
    merged = {}
    for view in model.iter_linears():
        if view.adapted:
            a, b = view.lora_a(), view.lora_b()
            merged[view.hf_name + ".weight"] = merge_linear(view.base_weight(), a, b, view.scale, view.magnitude())
    return merged


def peft_adapter_tensors(model: nnx.Module, prefix: str = "base_model.model.") -> dict[str, np.ndarray]:
    """Adapters under PEFT's ``adapter_model.safetensors`` names, float32.

    ``{prefix}model.layers.{i}.self_attn.q_proj.lora_A.weight`` [r, in] and ``...lora_B.weight``
    [out, r]; with DoRA also ``...lora_magnitude_vector`` [out] (PEFT's saved name: no ``.weight``);
    only adapted linears.
    """
    tensors = {}
    for view in model.iter_linears():
        if view.adapted:
            tensors[f"{prefix}{view.hf_name}.lora_A.weight"] = np.asarray(view.lora_a(), np.float32)
            tensors[f"{prefix}{view.hf_name}.lora_B.weight"] = np.asarray(view.lora_b(), np.float32)
            magnitude = view.magnitude()
            if magnitude is not None:
                tensors[f"{prefix}{view.hf_name}.lora_magnitude_vector"] = magnitude
    return tensors

