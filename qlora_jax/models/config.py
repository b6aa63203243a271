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
* mistral: LLaMA without biases, plus ``sliding_window`` (may be null: then none) on every layer.
* gemma2: GeGLU (``gelu_pytorch_tanh``), RMSNorm weights applied as ``(1 + w)`` in float32, four
  norms per layer (the attention and MLP outputs are normed too), embeddings scaled by
  ``sqrt(hidden_size)``, attention scale ``query_pre_attn_scalar ** -0.5``, soft-capped attention
  scores and final logits (``cap * tanh(x / cap)``), sliding-window layers interleaved with global
  ones (``layer_types``; default: even layers slide), tied embeddings.
* gemma3_text: gemma2 plus qwen3-style q/k norms (``(1 + w)``), no soft-capping by default (and
  transformers ignores ``attn_logit_softcapping`` here, so we do too), one global layer in
  ``sliding_window_pattern`` (default 6), sliding layers with their own rope base
  (``rope_local_base_freq``, unscaled) and the rope scaling on global layers only.
* phi3 (Phi-3, Phi-4-mini): LLaMA without biases, but with fused linears -- one ``qkv_proj``
  ``[q_size + 2 kv_size, hidden]`` (split q | k | v) and one ``gate_up_proj``
  ``[2 intermediate, hidden]`` (first half gate, second half up), each quantized and adapted as
  one matrix, as bitsandbytes and peft do; ``partial_rotary_factor`` (rope rotates only the first
  ``int(head_dim * factor)`` dims of each head); ``sliding_window`` (may be null) on every layer
  as in mistral. Rope scaling ("longrope", Phi-3-128k) is not supported.
* qwen3_moe: qwen3 attention (q/k norms, explicit ``head_dim``) with a sparse MoE block in place
  of the MLP on every layer (``qlora_jax.models.moe``): a float32 softmax router ``mlp.gate``
  ``[num_experts, hidden]``, top-``num_experts_per_tok`` experts per token (renormalized when
  ``norm_topk_prob``), fused expert weights ``mlp.experts.gate_up_proj [E, 2 moe_inter, hidden]``
  and ``down_proj [E, hidden, moe_inter]``. Dense-MLP layers (``decoder_sparse_step`` != 1,
  ``mlp_only_layers``) are not supported.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from qlora_jax.errors import ModelFileError
from qlora_jax.models import params as params_lib

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3",
                         "qwen3_moe")
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")  # SwiGLU / GeGLU (tanh-approximated GELU)
LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "projections", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("auto", "jax", "einsum", "splash", "cudnn")
QUANT_MATMUL_IMPLS = ("xla", "pallas", "auto")

# HF defaults of optional keys, per family (transformers 5.x configuration_*.py).
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  attention_bias=False, mlp_bias=False, hidden_act="silu"),
    "qwen2": dict(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  hidden_act="silu"),
    "qwen3": dict(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  attention_bias=False, hidden_act="silu", head_dim=128),
    "mistral": dict(max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    hidden_act="silu"),
    "gemma2": dict(max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True,
                   attention_bias=False, hidden_activation="gelu_pytorch_tanh", head_dim=256,
                   query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "gemma3_text": dict(max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=True,
                        attention_bias=False, hidden_activation="gelu_pytorch_tanh", head_dim=256,
                        query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6,
                        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0),
    "phi3": dict(max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 hidden_act="silu"),
    "qwen3_moe": dict(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      attention_bias=False, hidden_act="silu", num_experts=128, num_experts_per_tok=8,
                      moe_intermediate_size=768, norm_topk_prob=False, router_aux_loss_coef=0.001,
                      output_router_logits=False, decoder_sparse_step=1),
}
_GEMMA = ("gemma2", "gemma3_text")
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
    qk_norm: bool = False  # per-head RMSNorm of queries and keys (qwen3, gemma3)
    hidden_act: str = "silu"  # "silu" (SwiGLU) | "gelu_pytorch_tanh" (GeGLU, gemma)
    sliding_window: int | None = None  # sliding layers see only the last this-many positions (incl. own)
    layer_types: tuple[str, ...] = ()  # per layer "full_attention" | "sliding_attention"; () = all full
    rope_local_theta: float | None = None  # rope base of sliding layers, unscaled (gemma3); None: as global
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (gemma); None: head_dim
    attn_logit_softcap: float | None = None  # attention scores -> cap * tanh(scores / cap) (gemma2)
    final_logit_softcap: float | None = None  # output logits -> cap * tanh(logits / cap) (gemma2)
    embed_scale: bool = False  # input embeddings times sqrt(hidden_size), in the compute dtype (gemma)
    norm_plus_one: bool = False  # RMSNorm weight applied as (1 + w), in float32 (gemma)
    sandwich_norms: bool = False  # also norm the attention and MLP outputs: four norms per layer (gemma)
    fused_projections: bool = False  # one qkv_proj and one gate_up_proj linear instead of five (phi3)
    partial_rotary_factor: float = 1.0  # rope rotates the first int(head_dim * this) dims of each head (phi3)
    num_experts: int = 0  # experts per MoE layer; 0 = a dense MLP (qwen3_moe: every layer is MoE)
    num_experts_per_tok: int = 0  # top-k experts each token is routed to (qwen3_moe)
    moe_intermediate_size: int = 0  # hidden units of one expert (qwen3_moe)
    norm_topk_prob: bool = False  # renormalize the top-k router probabilities to sum to 1 (qwen3_moe)
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss when output_router_logits (qwen3_moe)
    output_router_logits: bool = False  # add router_aux_loss_coef * load-balancing loss to the SFT loss
    # Runtime knobs, not part of the HF config.
    remat_policy: str = "none"  # per decoder layer: "none" | "projections" | "full" | "dots" | "dots_no_batch"
    # "auto" (splash on TPU, cuDNN on GPU, "jax" elsewhere) | "jax" (jax.nn.dot_product_attention) | "einsum"
    # | "splash" | "cudnn" (models/attention_kernels.py; layers.attention_kernel says when each runs)
    attention_impl: str = "auto"
    quant_matmul_impl: str = "auto"  # 4-bit frozen matmul: "auto" (pallas on TPU, xla elsewhere) | "xla" | "pallas"

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelFileError(f"model_type {self.model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelFileError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ModelFileError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not 0.0 < self.partial_rotary_factor <= 1.0 or self.rotary_dim % 2 or not self.rotary_dim:
            raise ModelFileError(f"partial_rotary_factor {self.partial_rotary_factor!r} must be in (0, 1] and give "
                                 f"an even, non-zero rotary dim (head_dim {self.head_dim})")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ModelFileError(f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                                 f"got {self.num_experts_per_tok}")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ModelFileError(f"hidden_act {self.hidden_act!r} is not supported ({', '.join(HIDDEN_ACTS)})")
        if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
            raise ModelFileError(f"layer_types has {len(self.layer_types)} entries for "
                                 f"{self.num_hidden_layers} num_hidden_layers")
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        if bad:
            raise ModelFileError(f"unsupported config key 'layer_types' entries {bad} (supported: {LAYER_TYPES})")
        if any(self.sliding_layers) and (self.sliding_window is None or self.sliding_window < 1):
            raise ModelFileError(f"sliding_window must be a positive integer for sliding_attention layers, "
                                 f"got {self.sliding_window!r}")
        mixed = any(self.sliding_layers) and not all(self.sliding_layers)
        if (self.attention_impl in ("splash", "cudnn") and mixed) or (self.attention_impl == "cudnn"
                                                                       and self.attn_logit_softcap):
            # The kernels take one static window per model; cuDNN has no soft cap.
            raise ModelFileError(f"attention_impl {self.attention_impl!r} does not support "
                                 f"{'soft-capped' if not mixed else 'interleaved sliding/global'} attention "
                                 f"({self.model_type}); use 'auto', 'jax' or 'einsum'")
        for key in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ModelFileError(f"{key} must be positive, got {value!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ModelFileError(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ModelFileError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.quant_matmul_impl not in QUANT_MATMUL_IMPLS:
            raise ModelFileError(f"quant_matmul_impl must be one of {QUANT_MATMUL_IMPLS}, "
                                 f"got {self.quant_matmul_impl!r}")

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: whether it attends over a sliding window (``layer_types``)."""
        if not self.layer_types:
            return (False,) * self.num_hidden_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def attention_scale(self) -> float:
        """The factor on ``q . k``: ``query_pre_attn_scalar ** -0.5``, else ``head_dim ** -0.5``."""
        return float(self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None
                     else self.head_dim) ** -0.5

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that rope rotates (the first ones; transformers' ``int(head_dim * factor)``)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        """Output features of a fused ``qkv_proj`` (phi3): q | k | v."""
        return self.q_size + 2 * self.kv_size

    @property
    def gate_up_size(self) -> int:
        """Output features of a fused ``gate_up_proj`` (phi3): gate | up."""
        return 2 * self.intermediate_size

    @property
    def moe_gate_up_size(self) -> int:
        """Output features of one expert's fused ``gate_up_proj`` (qwen3_moe): gate | up."""
        return 2 * self.moe_intermediate_size

    @property
    def projections(self) -> tuple[str, ...]:
        """The decoder-layer linears of this model, transformers' (and peft's) names, in order:
        the seven of LLaMA, or phi3's ``qkv_proj, o_proj, gate_up_proj, down_proj``."""
        return tuple(params_lib.linear_shapes(self))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """HF ``[out, in]`` weight shape of each linear of one decoder layer (``projections``).

        Read from the parameter declaration (``qlora_jax.models.params.WEIGHTS``).
        """
        return params_lib.linear_shapes(self)

    def param_specs(self, *, quant: QuantConfig | None = None,
                    lora: Any = None) -> dict[str, params_lib.ParamSpec]:
        """Shape, dtype role and logical axes of every array of the model (``models/params.py``)."""
        return params_lib.param_specs(self, quant=quant, lora=lora)

    def linear_has_bias(self, name: str) -> bool:
        if name in ("q_proj", "k_proj", "v_proj", "qkv_proj"):
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

        for key in ("use_sliding_window", "use_bidirectional_attention"):
            if config.get(key):
                raise ModelFileError(f"unsupported config key {key!r} = true")

        heads = int(config["num_attention_heads"])
        head_dim = get("head_dim") or int(config["hidden_size"]) // heads
        gemma = model_type in _GEMMA
        rope_theta, rope_scaling, rope_local_theta = _parse_rope(config, get("rope_theta"),
                                                                 local=model_type == "gemma3_text")
        act_key = "hidden_activation" if gemma else "hidden_act"
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
            hidden_act=str(get(act_key)),
        )
        if model_type == "llama":
            fields.update(qkv_bias=bool(get("attention_bias")), o_bias=bool(get("attention_bias")),
                          mlp_bias=bool(get("mlp_bias")))
        elif model_type == "qwen2":
            fields.update(qkv_bias=True)
        elif model_type == "qwen3":
            fields.update(qkv_bias=bool(get("attention_bias")), o_bias=bool(get("attention_bias")),
                          qk_norm=True)
        elif model_type == "qwen3_moe":
            fields.update(qkv_bias=bool(get("attention_bias")), o_bias=bool(get("attention_bias")),
                          qk_norm=True, **_moe_fields(config, get))
        elif model_type in ("mistral", "phi3"):
            window = config.get("sliding_window")  # null: full attention everywhere
            if window is not None:
                fields.update(sliding_window=int(window),
                              layer_types=("sliding_attention",) * fields["num_hidden_layers"])
            if model_type == "phi3":
                if rope_scaling is not None:
                    raise ModelFileError(f"unsupported config key 'rope_scaling' for phi3: rope_type "
                                         f"{rope_scaling.rope_type!r} (supported: 'default')")
                fields.update(fused_projections=True, partial_rotary_factor=_partial_rotary_factor(config))
        else:  # gemma2, gemma3_text
            fields.update(qkv_bias=bool(get("attention_bias")), o_bias=bool(get("attention_bias")),
                          sliding_window=_int_or_none(get("sliding_window"), "sliding_window"),
                          layer_types=_gemma_layer_types(config, model_type, fields["num_hidden_layers"]),
                          rope_local_theta=rope_local_theta,
                          query_pre_attn_scalar=float(get("query_pre_attn_scalar")),
                          final_logit_softcap=_float_or_none(get("final_logit_softcapping")),
                          embed_scale=True, norm_plus_one=True, sandwich_norms=True)
            if model_type == "gemma2":
                fields.update(attn_logit_softcap=_float_or_none(get("attn_logit_softcapping")))
            else:
                fields.update(qk_norm=True)
        fields.update(overrides)
        return cls(**fields)


def _moe_fields(config: dict, get) -> dict[str, Any]:
    """The MoE fields of a qwen3_moe config; only all-sparse models (every layer an MoE block)."""
    if int(get("decoder_sparse_step")) != 1:
        raise ModelFileError(f"unsupported config key 'decoder_sparse_step' = {config['decoder_sparse_step']!r} "
                             f"(only 1: every layer sparse)")
    if config.get("mlp_only_layers"):
        raise ModelFileError(f"unsupported config key 'mlp_only_layers' = {config['mlp_only_layers']!r} "
                             f"(dense-MLP layers in an MoE model)")
    experts = config.get("num_experts", config.get("num_local_experts"))
    return dict(num_experts=int(get("num_experts") if experts is None else experts),
                num_experts_per_tok=int(get("num_experts_per_tok")),
                moe_intermediate_size=int(get("moe_intermediate_size")),
                norm_topk_prob=bool(get("norm_topk_prob")),
                router_aux_loss_coef=float(get("router_aux_loss_coef")),
                output_router_logits=bool(get("output_router_logits")))


def _partial_rotary_factor(config: dict) -> float:
    """``rope_parameters.partial_rotary_factor`` (5.x), else the top-level key (older files), else 1."""
    nested = config.get("rope_parameters") or {}
    value = nested.get("partial_rotary_factor") if isinstance(nested, dict) else None
    value = config.get("partial_rotary_factor") if value is None else value
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelFileError(f"config key 'partial_rotary_factor' must be a number, got {value!r}")
    return float(value)


def _int_or_none(value: Any, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelFileError(f"config key {key!r} must be an integer or null, got {value!r}")
    return value


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _gemma_layer_types(config: dict, model_type: str, num_layers: int) -> tuple[str, ...]:
    """``layer_types`` as given, else transformers' default: every ``pattern``-th layer is global
    (gemma2: pattern 2, gemma3: ``sliding_window_pattern``, default 6)."""
    types = config.get("layer_types")
    if types is not None:
        if not isinstance(types, list | tuple) or not all(isinstance(t, str) for t in types):
            raise ModelFileError(f"config key 'layer_types' must be a list of strings, got {types!r}")
        return tuple(types)
    pattern = 2 if model_type == "gemma2" else config.get("sliding_window_pattern", 6)
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
        raise ModelFileError(f"config key 'sliding_window_pattern' must be a positive integer, got {pattern!r}")
    return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers))


def _parse_rope(config: dict, default_theta: float | None = None, *,
                local: bool = False) -> tuple[float, RopeScaling | None, float | None]:
    """(rope_theta, scaling, local theta) from either ``rope_scaling`` (old) or ``rope_parameters`` (5.x).

    ``local`` (gemma3): the rope of sliding layers has its own base -- old spelling
    ``rope_local_base_freq``, 5.x ``rope_parameters.sliding_attention`` -- and no scaling; the
    global layers' rope is ``rope_parameters.full_attention`` (5.x) or ``rope_theta`` +
    ``rope_scaling``.
    """
    default_theta = _DEFAULT_ROPE_THETA if default_theta is None else default_theta
    nested = config.get("rope_parameters") or {}
    if local and isinstance(nested, dict) and ("full_attention" in nested or "sliding_attention" in nested):
        sliding = dict(nested.get("sliding_attention") or {})
        if sliding.get("rope_type", "default") != "default":
            raise ModelFileError(f"unsupported config key 'rope_parameters.sliding_attention.rope_type' = "
                                 f"{sliding['rope_type']!r} (supported: 'default')")
        local_theta = float(sliding.get("rope_theta", config.get("rope_local_base_freq") or 10_000.0))
        theta, scaling = _parse_rope_params(dict(nested.get("full_attention") or {}), config,
                                            "rope_parameters.full_attention", default_theta)
        return theta, scaling, local_theta
    key = "rope_parameters" if config.get("rope_parameters") is not None else "rope_scaling"
    theta, scaling = _parse_rope_params(dict(config.get(key) or {}), config, key, default_theta)
    local_theta = float(config.get("rope_local_base_freq") or 10_000.0) if local else None
    return theta, scaling, local_theta


def _parse_rope_params(params: dict, config: dict, key: str,
                       default_theta: float) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) of one rope parameter dict; ``key`` names it in errors."""
    theta = params.get("rope_theta", config.get("rope_theta"))
    theta = float(default_theta if theta is None else theta)
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
