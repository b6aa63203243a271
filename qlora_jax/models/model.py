"""The LLaMA / Qwen / Mistral / Gemma 2-3 decoder as a Flax NNX module, with frozen (optionally
NF4) base weights and LoRA adapters.

Parameter tree (transformers names with the ``model.`` prefix dropped and the layer index moved
into a leading axis of every decoder-layer array)::

    embed_tokens.weight                         BaseParam [vocab, hidden]
    layers.input_layernorm.weight               BaseParam [L, hidden]
    layers.self_attn.{q,k,v,o}_proj.weight      QuantParam(Quant4bit) or BaseParam [L, out, in]
    layers.self_attn.{q,k,v,o}_proj.bias        BaseParam [L, out]        (if the family has it)
    layers.self_attn.{q,k,v,o}_proj.lora_a      LoRAParam [L, r, in]      (if targeted)
    layers.self_attn.{q,k,v,o}_proj.lora_b      LoRAParam [L, out, r]     (if targeted)
    layers.self_attn.{q,k,v,o}_proj.lora_magnitude  LoRAParam [L, out]    (if targeted, DoRA)
    layers.self_attn.{q,k}_norm.weight          BaseParam [L, head_dim]   (qwen3, gemma3)
    layers.post_attention_layernorm.weight      BaseParam [L, hidden]
    layers.{pre,post}_feedforward_layernorm.weight  BaseParam [L, hidden] (gemma: sandwich norms)
    layers.mlp.{gate,up,down}_proj.*            as the attention projections
    layers.self_attn.qkv_proj.*, layers.mlp.gate_up_proj.*   phi3's fused linears, in place of
                                                q/k/v [L, q + 2 kv, hidden] and gate/up [L, 2 inter, hidden]
    layers.mlp.gate.weight, layers.mlp.experts.{gate_up,down}_proj.*   qwen3_moe's router [L, E, hidden]
                                                and experts [L, E, out, in] in place of the MLP (models/moe.py)
    norm.weight                                 BaseParam [hidden]
    lm_head.weight                              BaseParam [vocab, hidden] (untied only)

A ``Quant4bit`` weight's arrays are ``packed`` uint8 [L, out, in/2], ``absmax`` uint8 (double
quantized) or float32 [L, out, in/blocksize], ``nested_absmax`` float32 [L, n_nested] and
``offset`` float32 [L] (row layout; see ``qlora_jax.quant``). Its static ``shape`` stays the
per-layer ``(out, in)``.

The decoder layers are stacked and run with ``jax.lax.scan``, so compile time does not grow with
depth; ``config.remat_policy`` wraps each layer step in ``jax.checkpoint``. Layers that differ
(Gemma's sliding-window layers interleaved with global ones, Gemma 3's local rope base) are one
scanned flag per layer that selects between two masks / rope tables built once, not Python branches. Incremental decoding
(:meth:`CausalLM.decode`) runs the same scan with an explicit stacked KV cache in its carry
(``models.kv_cache``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qlora_jax import lora as lora_lib
from qlora_jax.models import kv_cache, layers, moe
from qlora_jax.models.config import ModelConfig, QuantConfig

# Residuals kept by the "projections" policy: the outputs of the q/k/v and gate/up projections
# (frozen matmul plus adapter), the attention output and the residual stream after attention. Everything else in a layer (norms, rope,
# attention scores and probabilities, SiLU, the down-projection input) is recomputed from them
# in the backward pass: elementwise work and the attention matmuls, never a projection.
# "dora_norm": DoRA's per-row weight norms [out] (tiny; recomputing them would decode W again).
SAVED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "attn_out", "attn_residual", "gate_proj", "up_proj",
                     "dora_norm", "qkv_proj", "gate_up_proj")  # the last two: phi3's fused outputs

_REMAT_POLICIES = {
    "projections": jax.checkpoint_policies.save_only_these_names(*SAVED_PROJECTIONS),
    "full": None,  # save only the layer's inputs; recompute everything else
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def default_compute_dtype() -> jnp.dtype:
    """float32 on CPU (exact parity), bfloat16 on accelerators."""
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)


def _block_linears(config: ModelConfig, block: str) -> tuple[str, ...]:
    """The linears of one block ("self_attn" or "mlp") of a decoder layer of this config."""
    return tuple(p for p in config.projections if lora_lib.PROJECTION_BLOCK[p] == block)


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings (and per-head q/k RMSNorm for qwen3).

    With ``config.fused_projections`` (phi3) one ``qkv_proj`` linear computes q | k | v, split
    along its output after the (frozen + adapter) matmul, as transformers does.
    """

    def __init__(self, config: ModelConfig, layer_lora: dict[str, lora_lib.LoraConfig | None],
                 quant: QuantConfig | None, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.config = config
        shapes = config.linear_shapes()
        for name in _block_linears(config, "self_attn"):
            out_f, in_f = shapes[name]
            setattr(self, name, layers.QLoRALinear(
                in_f, out_f, use_bias=config.linear_has_bias(name), quant=quant, lora=layer_lora[name],
                dtype=dtype, param_dtype=param_dtype, rngs=rngs, matmul_impl=config.quant_matmul_impl))
        if config.qk_norm:
            norm_kw = dict(eps=config.rms_norm_eps, param_dtype=param_dtype, plus_one=config.norm_plus_one)
            self.q_norm = layers.RMSNorm(config.head_dim, **norm_kw)
            self.k_norm = layers.RMSNorm(config.head_dim, **norm_kw)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, *, cos, sin, mask, lora_kw: dict[str, dict], kv: tuple | None = None,
                 kernel_kw: dict | None = None):
        """``x [b, s, hidden] -> [b, s, hidden]``.

        ``kernel_kw`` (``use_kernel``, ``segment_ids``, ``sliding_window``): what ``mask`` was built
        from, so that an attention kernel may replace it (``layers.attention``).

        ``kv = (k_all, v_all, layer, index)``: a stacked KV cache (see ``models.kv_cache``); the new
        keys and values are written at slots ``index..`` of ``layer``, the queries attend over that
        layer's whole slab (``mask`` is then ``[b, 1, s, max_len]``), and the call returns
        ``(out, (k_all, v_all))``.
        """
        b, s, _ = x.shape
        c = self.config
        if c.fused_projections:
            qkv = checkpoint_name(self.qkv_proj(x, **lora_kw["qkv_proj"]), "qkv_proj")  # [b, s, q + 2 kv]
            q, k, v = jnp.split(qkv, [c.q_size, c.q_size + c.kv_size], axis=-1)
        else:
            q = checkpoint_name(self.q_proj(x, **lora_kw["q_proj"]), "q_proj")
            k = checkpoint_name(self.k_proj(x, **lora_kw["k_proj"]), "k_proj")
            v = checkpoint_name(self.v_proj(x, **lora_kw["v_proj"]), "v_proj")
        q = q.reshape(b, s, c.num_attention_heads, c.head_dim)
        k = k.reshape(b, s, c.num_key_value_heads, c.head_dim)
        v = v.reshape(b, s, c.num_key_value_heads, c.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
        if kv is not None:
            k_all, v_all, k, v = kv_cache.write_layer(*kv, k, v)
        out = layers.attention(q, k, v, mask, impl=c.attention_impl, causal=kv is None, scale=c.attention_scale,
                               logits_soft_cap=c.attn_logit_softcap, **(kernel_kw or {}))  # [b, s, heads, head_dim]
        out = self.o_proj(checkpoint_name(out.reshape(b, s, c.q_size), "attn_out"), **lora_kw["o_proj"])
        return out if kv is None else (out, (k_all, v_all))


class MLP(nnx.Module):
    """Gated feed-forward: ``down(act(gate(x)) * up(x))``, SwiGLU (silu) or GeGLU (tanh GELU, gemma).

    With ``config.fused_projections`` (phi3) one ``gate_up_proj`` computes gate | up (halves of its output).
    """

    def __init__(self, config: ModelConfig, layer_lora: dict[str, lora_lib.LoraConfig | None],
                 quant: QuantConfig | None, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        shapes = config.linear_shapes()
        self.fused = config.fused_projections
        for name in _block_linears(config, "mlp"):
            out_f, in_f = shapes[name]
            setattr(self, name, layers.QLoRALinear(
                in_f, out_f, use_bias=config.linear_has_bias(name), quant=quant, lora=layer_lora[name],
                dtype=dtype, param_dtype=param_dtype, rngs=rngs, matmul_impl=config.quant_matmul_impl))
        self.gelu = config.hidden_act == "gelu_pytorch_tanh"

    def __call__(self, x, *, lora_kw: dict[str, dict]) -> jax.Array:
        if self.fused:
            gate_up = checkpoint_name(self.gate_up_proj(x, **lora_kw["gate_up_proj"]), "gate_up_proj")  # [b, s, 2 inter]
            gate, up = (layers.shard_activation(t, "tensor") for t in jnp.split(gate_up, 2, axis=-1))
        else:
            gate = checkpoint_name(layers.shard_activation(self.gate_proj(x, **lora_kw["gate_proj"]), "tensor"),
                                   "gate_proj")
            up = checkpoint_name(layers.shard_activation(self.up_proj(x, **lora_kw["up_proj"]), "tensor"), "up_proj")
        act = jax.nn.gelu(gate, approximate=True) if self.gelu else jax.nn.silu(gate)
        return self.down_proj(act * up, **lora_kw["down_proj"])


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: attention then MLP.

    With ``config.sandwich_norms`` (gemma) the attention and MLP outputs are normed too before
    each residual add: ``post_attention_layernorm`` then norms the attention output and
    ``pre_feedforward_layernorm`` the MLP input (transformers' names).
    """

    def __init__(self, config: ModelConfig, layer_lora: dict[str, lora_lib.LoraConfig | None],
                 quant: QuantConfig | None, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        def norm():
            return layers.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype,
                                  plus_one=config.norm_plus_one)

        self.input_layernorm = norm()
        self.self_attn = Attention(config, layer_lora, quant, dtype, param_dtype, rngs)
        self.post_attention_layernorm = norm()
        if config.num_experts:  # qwen3_moe (models/moe.py); its expert adapters come from lora.target_parameters
            self.mlp = moe.SparseMoeBlock(config, layer_lora.get("mlp.experts"), quant, dtype, param_dtype, rngs)
        else:
            self.mlp = MLP(config, layer_lora, quant, dtype, param_dtype, rngs)
        if config.sandwich_norms:
            self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        else:
            self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None

    def __call__(self, h, *, cos, sin, mask, lora_kw: dict[str, dict], kv: tuple | None = None,
                 kernel_kw: dict | None = None):
        """``h -> h``; with a KV cache ``kv`` (see :class:`Attention`) ``-> (h, (k_all, v_all))``."""
        h = layers.shard_activation(h)  # the residual stream: batch over (data, fsdp) in training
        attn = self.self_attn(self.input_layernorm(h), cos=cos, sin=sin, mask=mask, lora_kw=lora_kw, kv=kv,
                              kernel_kw=kernel_kw)
        if kv is not None:
            attn, kv = attn
        if self.pre_feedforward_layernorm is not None:  # sandwich norms (gemma)
            attn = self.post_attention_layernorm(attn)
        h = checkpoint_name(layers.shard_activation(h + attn), "attn_residual")  # saved: o_proj is not rerun
        if self.pre_feedforward_layernorm is None:
            h = h + self.mlp(self.post_attention_layernorm(h), lora_kw=lora_kw)
        else:
            h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h), lora_kw=lora_kw))
        return h if kv is None else (h, kv)


@dataclasses.dataclass(frozen=True)
class LinearView:
    """One decoder linear of one layer, for merging and export (host-side, float32)."""

    hf_name: str  # transformers module name, e.g. "model.layers.3.self_attn.q_proj"
    proj: str  # "q_proj", ...
    layer: int
    linear: layers.QLoRALinear  # the stacked module (all layers)
    adapted: bool  # this layer's copy has an active adapter
    scale: float

    def base_weight(self) -> np.ndarray:
        return self.linear.base_weight(self.layer)

    def bias(self) -> np.ndarray | None:
        return self.linear.bias_value(self.layer)

    def lora_a(self) -> np.ndarray:
        return self.linear.lora_weights(self.layer)[0]

    def lora_b(self) -> np.ndarray:
        return self.linear.lora_weights(self.layer)[1]

    def magnitude(self) -> np.ndarray | None:
        """DoRA's magnitude [out], or None without DoRA."""
        return self.linear.magnitude(self.layer)


class CausalLM(nnx.Module):
    """LLaMA / Qwen causal language model with frozen base weights and optional LoRA.

    ``quant``: store every decoder-layer linear 4-bit (embeddings, norms and lm_head stay in
    ``param_dtype``, as bitsandbytes' skip modules). ``lora``: adapters on the targeted linears.
    ``dtype``: compute dtype (default: float32 on CPU, bfloat16 elsewhere); ``param_dtype``:
    storage dtype of unquantized base weights (default: ``dtype``).

    When ``lora.targets`` selects a projection in only some layers, the stacked ``lora_a`` /
    ``lora_b`` still have a slot per layer; the slots of untargeted layers are gated off (their
    contribution and gradient are exactly zero) and are left out of counts, merges and exports.
    """

    def __init__(self, config: ModelConfig, *, lora: lora_lib.LoraConfig | None = None,
                 quant: QuantConfig | None = None, dtype: Any = None, param_dtype: Any = None,
                 rngs: nnx.Rngs):
        self.config = config
        self.lora_config = lora
        self.quant_config = quant
        self.dtype = jnp.dtype(dtype) if dtype is not None else default_compute_dtype()
        self.param_dtype = jnp.dtype(param_dtype) if param_dtype is not None else self.dtype
        n = config.num_hidden_layers
        adapter_key = rngs.lora()  # drawn first: build_model derives the same key from its seed

        masks = {p: lora.layer_mask(n, p) if lora is not None else (False,) * n for p in config.projections}
        if lora is not None:
            lora.targeted_modules(n, config.projections)  # raises if the targets select nothing
        # Per projection: which layers are adapted (static), e.g. (("q_proj", (True, False)), ...).
        self.lora_layer_mask = tuple((p, masks[p]) for p in config.projections)
        layer_lora = {p: (lora if any(masks[p]) else None) for p in config.projections}
        if config.num_experts:
            layer_lora["mlp.experts"] = lora  # MoE: the block reads lora.target_parameters (models/moe.py)

        self.embed_tokens = layers.Embedding(config.vocab_size, config.hidden_size, dtype=self.dtype,
                                             param_dtype=self.param_dtype, rngs=rngs,
                                             scale=config.hidden_size ** 0.5 if config.embed_scale else None)

        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=0, out_axes=0)
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, layer_lora, quant, self.dtype, self.param_dtype, rngs)

        self.layers = make_layers(rngs)
        self.norm = layers.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=self.param_dtype,
                                   plus_one=config.norm_plus_one)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = layers.LMHead(config.vocab_size, config.hidden_size,
                                         param_dtype=self.param_dtype, rngs=rngs)
        if lora is not None:
            lora_lib.init_adapters(self, lora, adapter_key)

    # ----------------------------------------------------------------------------------------
    def __call__(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, lora_enabled: bool = True,
                 deterministic: bool = True, rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
        """Logits ``[batch, seq, vocab]`` in the compute dtype for ``input_ids [batch, seq]``.

        ``positions [batch, seq]``: rotary positions (default ``0..seq-1``, or restarting per
        segment when ``segment_ids`` is given). ``segment_ids [batch, seq]``: packed sequences,
        0 = padding; attention is causal within a segment. ``lora_enabled=False``: the base
        model (e.g. DPO's reference). ``deterministic=False`` with ``rngs`` (an ``nnx.Rngs``,
        whose "dropout" stream is used, or a PRNG key): LoRA dropout on.
        """
        return self._forward(input_ids, positions, segment_ids, lora_enabled, deterministic, rngs, "logits")

    def hidden_states(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
                      segment_ids: jax.Array | None = None, lora_enabled: bool = True,
                      deterministic: bool = True, rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
        """Final hidden states ``[batch, seq, hidden]`` (after the last norm, before lm_head).

        Same arguments as ``__call__``; with :meth:`logits_from_hidden` on slices of the result a
        loss never materializes the whole ``[batch, seq, vocab]`` logits.
        """
        return self._forward(input_ids, positions, segment_ids, lora_enabled, deterministic, rngs, "hidden")

    def hidden_and_router_logits(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
                                 segment_ids: jax.Array | None = None, lora_enabled: bool = True,
                                 deterministic: bool = True,
                                 rngs: nnx.Rngs | jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """MoE models: :meth:`hidden_states` and every layer's router logits ``[layers, batch * seq,
        experts]`` (float32), the input of ``moe.load_balancing_loss``."""
        if not self.config.num_experts:
            raise ValueError(f"{self.config.model_type} has no router (not a mixture of experts)")
        return self._forward(input_ids, positions, segment_ids, lora_enabled, deterministic, rngs, "hidden_router")

    def router_aux_loss(self, router_logits: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """transformers' load-balancing loss of :meth:`hidden_and_router_logits`' router logits
        (``moe.load_balancing_loss``; ``attention_mask [batch, seq]``, 1 = real token), unweighted."""
        return moe.load_balancing_loss(router_logits, self.config.num_experts_per_tok, attention_mask)

    def lm_head_weight(self) -> jax.Array:
        """The output projection ``[vocab, hidden]`` in the compute dtype (tied or not)."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return head.weight.get_value().astype(self.dtype)

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        """``[..., hidden] -> [..., vocab]`` in the compute dtype (soft-capped when the config says so)."""
        logits = jnp.einsum("...d,vd->...v", h.astype(self.dtype), self.lm_head_weight())
        return layers.soft_cap(logits, self.config.final_logit_softcap)

    def _forward(self, input_ids, positions, segment_ids, lora_enabled, deterministic, rngs, output):
        use_lora = bool(lora_enabled) and self.lora_config is not None
        dropout_key = None
        if use_lora and not deterministic and self.lora_config.dropout > 0:
            if rngs is None:
                raise ValueError("LoRA dropout needs rngs when deterministic=False")
            dropout_key = rngs.dropout() if isinstance(rngs, nnx.Rngs) else rngs
        graphdef, state = nnx.split(self)
        return _forward_jit(graphdef, state, input_ids, positions, segment_ids, dropout_key,
                            use_lora=use_lora, output=output)

    def init_cache(self, batch: int, max_len: int, *, start: jax.Array | None = None) -> kv_cache.KVCache:
        """An empty :class:`~qlora_jax.models.kv_cache.KVCache` in the compute dtype.

        ``start [batch]``: number of left-padding slots of each row (default none).
        """
        return kv_cache.KVCache.create(self.config, batch, max_len, dtype=self.dtype, start=start)

    def decode(self, input_ids: jax.Array, cache: kv_cache.KVCache, *,
               lora_enabled: bool = True) -> tuple[jax.Array, kv_cache.KVCache]:
        """Run ``input_ids [batch, t]`` at the cache's next ``t`` slots -> ``(hidden, cache)``.

        Prefill is a call with the (left-padded) prompts on an empty cache, each decode step a
        call with ``t = 1``. Returns the final hidden states ``[batch, t, hidden]`` (feed the
        ones needed to :meth:`logits_from_hidden`) and the cache with the new keys/values
        written and ``index`` advanced by ``t``. The cache must have room: ``index + t <=
        max_len`` (slots past the end are not checked under ``jit``). Pure and traceable: it is
        meant to be called inside a jitted prefill / decode loop (``qlora_jax.inference.generate``).
        """
        use_lora = bool(lora_enabled) and self.lora_config is not None
        h, cache = self._run(input_ids, None, None, None, use_lora, cache=cache)
        return h, cache

    def _run(self, input_ids, positions, segment_ids, dropout_key, use_lora: bool, cache=None,
             with_router_logits: bool = False):
        """Embeddings -> scanned decoder layers -> final norm: ``[batch, seq, hidden]``.

        With a ``cache`` (positions and mask then come from it): ``(hidden, updated cache)``.
        """
        c = self.config
        batch, seq = input_ids.shape
        sliding = c.sliding_layers
        window = c.sliding_window if any(sliding) else None

        def make_mask(sliding_window):
            if cache is not None:
                return cache.attention_mask(seq, sliding_window=sliding_window)
            return layers.attention_mask(segment_ids, seq, sliding_window=sliding_window)

        if cache is not None:
            positions = cache.positions(seq)
        elif positions is None:
            if segment_ids is not None:
                positions = layers.positions_from_segments(segment_ids)
            else:
                positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        mask = make_mask(window if all(sliding) else None)
        cos, sin = layers.rope_cos_sin(positions, layers.rope_inv_freq(c), self.dtype)
        # Interleaved sliding / global layers (gemma): both masks (and, with gemma3's local rope
        # base, both rope tables) are built once; each scanned layer selects by its "sliding" flag.
        mixed = any(sliding) and not all(sliding)
        local_rope = any(sliding) and c.rope_local_theta is not None
        if mixed:
            local_mask = make_mask(window)
        if local_rope:
            local_cos, local_sin = layers.rope_cos_sin(positions, layers.rope_inv_freq(c, local=True), self.dtype)

        xs: dict[str, Any] = {}  # per-layer inputs scanned alongside the layer weights
        if dropout_key is not None:
            xs["key"] = jax.random.split(dropout_key, c.num_hidden_layers)
        if use_lora:
            partial = {p: m for p, m in self.lora_layer_mask if any(m) and not all(m)}
            if partial:
                xs["gates"] = {p: jnp.asarray(m, self.dtype) for p, m in partial.items()}
        if cache is not None:
            xs["layer"] = jnp.arange(c.num_hidden_layers, dtype=jnp.int32)
        if mixed or local_rope:
            xs["sliding"] = jnp.asarray(sliding)

        # Attention kernels (splash, cuDNN) build this mask themselves from the segment ids; not with
        # the KV cache, nor with interleaved sliding/global layers (their window is a per-layer flag).
        kernel_kw = None
        if cache is None and not mixed:
            kernel_kw = dict(use_kernel=True, segment_ids=segment_ids,
                             sliding_window=window if all(sliding) else None)

        graphdef, layer_state = nnx.split(self.layers)

        def step(carry, xs_i):
            layer_state_i, extra = xs_i
            layer = nnx.merge(graphdef, layer_state_i)
            lora_kw = {}
            for i, p in enumerate(c.projections):
                kw: dict[str, Any] = {"lora_enabled": use_lora}
                if "key" in extra:
                    kw["dropout_key"] = jax.random.fold_in(extra["key"], i)
                if p in extra.get("gates", {}):
                    kw["lora_gate"] = extra["gates"][p]
                lora_kw[p] = kw
            mask_i, cos_i, sin_i = mask, cos, sin
            if "sliding" in extra:
                if mixed:
                    mask_i = jnp.where(extra["sliding"], local_mask, mask)
                if local_rope:
                    cos_i = jnp.where(extra["sliding"], local_cos, cos)
                    sin_i = jnp.where(extra["sliding"], local_sin, sin)
            if cache is None:
                out = layer(carry, cos=cos_i, sin=sin_i, mask=mask_i, lora_kw=lora_kw, kernel_kw=kernel_kw)
                # MoE: this layer's router logits [b * s, E] float32, stacked by the scan
                return out, (layer.mlp.router_logits.get_value() if c.num_experts else None)
            h, (k_all, v_all) = carry
            kv = (k_all, v_all, extra["layer"], cache.index)
            return layer(h, cos=cos_i, sin=sin_i, mask=mask_i, lora_kw=lora_kw, kv=kv), None

        if c.remat_policy != "none" and cache is None:
            step = jax.checkpoint(step, policy=_REMAT_POLICIES[c.remat_policy], prevent_cse=False)
        h = self.embed_tokens(input_ids)
        if cache is None:
            h, router_logits = jax.lax.scan(step, h, (layer_state, xs))
            return (self.norm(h), router_logits) if with_router_logits else self.norm(h)
        (h, (k_all, v_all)), _ = jax.lax.scan(step, (h, (cache.k, cache.v)), (layer_state, xs))
        cache = dataclasses.replace(cache, k=k_all, v=v_all, index=cache.index + seq)
        return self.norm(h), cache

    # ----------------------------------------------------------------------------------------
    def iter_linears(self) -> Iterator[LinearView]:
        """Every decoder linear of every layer, in transformers order (layer, then q..down)."""
        masks = dict(self.lora_layer_mask)
        for i in range(self.config.num_hidden_layers):
            for p in self.config.projections:
                linear = getattr(getattr(self.layers, lora_lib.PROJECTION_BLOCK[p]), p)
                adapted = linear.adapted and masks[p][i]
                yield LinearView(f"model.{lora_lib.module_path(i, p)}", p, i, linear, adapted, linear.scale)


@functools.partial(jax.jit, static_argnames=("graphdef", "use_lora", "output"))
def _forward_jit(graphdef, state, input_ids, positions, segment_ids, dropout_key, *, use_lora, output):
    """The forward pass as one compiled program, cached per model structure and input shapes.

    Called eagerly, a model would otherwise re-trace and re-compile its layer scan on every call;
    under an outer ``jit`` / ``grad`` this nested jit is simply inlined.
    """
    model = nnx.merge(graphdef, state)
    if output == "hidden_router":  # MoE: (hidden, router logits [layers, batch * seq, experts])
        return model._run(input_ids, positions, segment_ids, dropout_key, use_lora, with_router_logits=True)
    h = model._run(input_ids, positions, segment_ids, dropout_key, use_lora)
    return model.logits_from_hidden(h) if output == "logits" else h
