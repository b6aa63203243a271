"""Model and quantization configs: the facts a decoder needs, parsed from a transformers config.json.

``ModelConfig`` is the single source of truth for sizes and architecture switches of the LLaMA
and Qwen families we support; which parameters exist, their shapes (as ``ModelConfig`` sizes),
dtypes and logical sharding axes are declared in ``qlora_jax.models.params``
(``ModelConfig.param_specs()``, ``linear_shapes()``). It is built from a Hugging Face ``config.json`` (a dict or a path)
so that a checkpoint directory fully describes its model; a few runtime knobs that are not part of
the HF config (remat policy, attention implementation) have defaults and can be overridden.

Family differences, as transformers implements them:

* llama (2 / 3 / 3.1 / 3.2): optional ``attention_bias`` on q, k, v and o; optional ``mlp_bias``;
  rope types "default", "linear" and "llama3"; GQA via ``num_key_value_heads``.
* qwen2 / qwen2.5: a bias on q, k and v (never on o), no other biases; same rope.
* qwen3: RMSNorm over ``head_dim`` applied to each query and key head before rope; an explicit
  ``head_dim`` (default 128, not hidden / heads); ``attention_bias`` on q, k, v and o.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from qlora_jax.errors import ModelFileError
from qlora_jax.models import params as params_lib

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "projections", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("jax", "einsum")

# HF defaults of optional keys, per family (transformers 5.x configuration_*.py).
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  attention_bias=False, mlp_bias=False, hidden_act="silu"),
    "qwen2": dict(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  hidden_act="silu"),
    "qwen3": dict(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  attention_bias=False, hidden_act="silu", head_dim=128),
}
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads")
_DEFAULT_ROPE_THETA = 10000.0


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rescaling of rotary frequencies for long context.

    ``rope_type`` "linear": every inverse frequency is divided by ``factor``.
    ``rope_type`` "llama3" (Llama 3.1+): wavelengths longer than
    ``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``, shorter than
    ``original_max_position_embeddings / high_freq_factor`` are kept, and the band in between is
    interpolated smoothly.
    """

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How frozen decoder-layer linears are stored: bitsandbytes-style blockwise 4-bit."""

    quant_type: str = "nf4"  # "nf4" | "fp4"
    blocksize: int = 64  # values per absmax block
    double_quant: bool = True  # 8-bit quantize the absmax values too (QLoRA's "DQ")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a LLaMA / Qwen decoder, in transformers' terms (see module docstring)."""

    model_type: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q_proj, k_proj, v_proj
    o_bias: bool = False  # bias on o_proj
    mlp_bias: bool = False  # bias on gate_proj, up_proj, down_proj
    qk_norm: bool = False  # per-head RMSNorm of queries and keys (qwen3)
    hidden_act: str = "silu"
    # Runtime knobs, not part of the HF config.
    remat_policy: str = "none"  # per decoder layer: "none" | "projections" | "full" | "dots" | "dots_no_batch"
    attention_impl: str = "jax"  # "jax" (jax.nn.dot_product_attention) | "einsum"

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelFileError(f"model_type {self.model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelFileError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ModelFileError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ModelFileError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.remat_policy not in REMAT_POLICIES:
            raise ModelFileError(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ModelFileError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """HF ``[out, in]`` weight shape of each of the seven linears of one decoder layer.

        Read from the parameter declaration (``qlora_jax.models.params.WEIGHTS``).
        """
        return params_lib.linear_shapes(self)

    def param_specs(self, *, quant: QuantConfig | None = None,
                    lora: Any = None) -> dict[str, params_lib.ParamSpec]:
        """Shape, dtype role and logical axes of every array of the model (``models/params.py``)."""
        return params_lib.param_specs(self, quant=quant, lora=lora)

    def linear_has_bias(self, name: str) -> bool:
        if name in ("q_proj", "k_proj", "v_proj"):
            return self.qkv_bias
        if name == "o_proj":
            return self.o_bias
        return self.mlp_bias

    @classmethod
    def from_hf(cls, config: dict | str | os.PathLike, **overrides) -> ModelConfig:
        """Parse a transformers ``config.json`` (dict, file path, or a directory holding one).

        Accepts both rope spellings: transformers <5 (``rope_theta`` + ``rope_scaling``) and 5.x
        (``rope_parameters`` holding ``rope_theta``). ``overrides`` replace fields afterwards
        (e.g. ``remat_policy="full"``). Raises ``ModelFileError`` (a ``ValueError``) naming the offending key.
        """
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            try:
                with open(path, encoding="utf-8") as f:
                    config = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ModelFileError(f"{path}: invalid JSON ({e})") from e
            try:
                return cls.from_hf(config, **overrides)
            except ModelFileError as e:
                raise ModelFileError(f"{path}: {e}") from e
        if not isinstance(config, dict):
            raise ModelFileError(f"config.json must hold a JSON object, got {type(config).__name__}")
        model_type = config.get("model_type")
        if model_type is None:
            raise ModelFileError("config is missing the key 'model_type'")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelFileError(f"unsupported config key 'model_type' = {model_type!r} "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        missing = [k for k in _REQUIRED_KEYS if config.get(k) is None]
        if missing:
            raise ModelFileError(f"{model_type} config is missing required key(s): {', '.join(missing)}")

        def get(key):
            value = config.get(key)
            return _FAMILY_DEFAULTS[model_type].get(key) if value is None else value

        for key in ("use_sliding_window",):
            if config.get(key):
                raise ModelFileError(f"unsupported config key {key!r} = true (sliding-window attention)")

        heads = int(config["num_attention_heads"])
        head_dim = get("head_dim") or int(config["hidden_size"]) // heads
        rope_theta, rope_scaling = _parse_rope(config)
        fields = dict(
            model_type=model_type,
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(get("rms_norm_eps")),
            rope_theta=rope_theta,
            max_position_embeddings=int(get("max_position_embeddings")),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            hidden_act=str(get("hidden_act")),
        )
        if model_type == "llama":
            fields.update(qkv_bias=bool(get("attention_bias")), o_bias=bool(get("attention_bias")),
                          mlp_bias=bool(get("mlp_bias")))
        elif model_type == "qwen2":
            fields.update(qkv_bias=True)
        else:  # qwen3
            fields.update(qkv_bias=bool(get("attention_bias")), o_bias=bool(get("attention_bias")),
                          qk_norm=True)
        fields.update(overrides)
        return cls(**fields)


def _parse_rope(config: dict) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either ``rope_scaling`` (old) or ``rope_parameters`` (5.x)."""
    key = "rope_parameters" if config.get("rope_parameters") is not None else "rope_scaling"
    params = dict(config.get(key) or {})
    theta = params.get("rope_theta", config.get("rope_theta"))
    theta = float(_DEFAULT_ROPE_THETA if theta is None else theta)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ModelFileError(f"unsupported config key '{key}.rope_type' = {rope_type!r} "
                         f"(supported: {', '.join(ROPE_TYPES)})")
    if rope_type == "default":
        return theta, None

    def need(name):
        if params.get(name) is None:
            raise ModelFileError(f"rope_type {rope_type!r} needs the config key '{key}.{name}'")
        return params[name]

    factor = float(need("factor"))
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor)
    original = params.get("original_max_position_embeddings") or config.get("max_position_embeddings")
    if original is None:
        raise ModelFileError(f"rope_type 'llama3' needs '{key}.original_max_position_embeddings'")
    return theta, RopeScaling("llama3", factor, float(need("low_freq_factor")),
                              float(need("high_freq_factor")), int(original))
