"""The attention kernels of ``qlora_jax/models/attention_kernels.py`` against the dense path.

Reference: ``layers._dense_attention`` (einsum, float32 scores and softmax) with the boolean mask of
``layers.attention_mask`` (both checked against transformers in tests/test_models.py). Splash
attention runs in Pallas' interpreter on CPU: the kernel's own code (its block tables, segment
masking, online softmax and the dq / dkv backward kernels), not a reimplementation. The cuDNN
kernel cannot run without a GPU; its call (causal flag, segment mask, window) is checked through
jax's XLA implementation, and its compile for H100 is checked in ``.venv-cuda``.

The compiled training steps (splash on a v5e:2x2 topology, cuDNN on 4 H100s: no buffer shaped like
attention scores ``[b, heads, t, s]`` in the optimized HLO) are checked in tests/test_tpu_compile.py
and tests/test_gpu_compile.py, on the same compile as their memory figures.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qlora_jax.errors import UserError
from qlora_jax.models import CausalLM, ModelConfig, layers
from qlora_jax.models.attention_kernels import cudnn_attention, splash_attention

B, HEADS, KV_HEADS, D = 2, 4, 2, 64
# Measured (2026-12-01, jax 0.10.2, interpret mode): forward 4.8e-7, gradients 1.3e-5 on entries
# up to ~30 (relative 1.2e-6). The bounds leave ~10x.
FWD_TOL = 5e-6
GRAD_RTOL = 1e-5  # max |error| / max |reference gradient|


def _segments(t: int) -> np.ndarray:
    """Row 0: three packed sequences then right padding; row 1: left padding, one sequence, right
    padding (as a GRPO rollout)."""
    seg = np.zeros((B, t), np.int32)
    a, b, c = t // 4, t // 2 + 7, t - t // 8
    seg[0, :a], seg[0, a:b], seg[0, b:c] = 1, 2, 3
    seg[1, 9:t - 11] = 1
    return seg


def _qkv(t: int, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    r = np.random.default_rng(seed)
    return (jnp.asarray(r.normal(size=(B, t, HEADS, D)), jnp.float32),
            jnp.asarray(r.normal(size=(B, t, KV_HEADS, D)), jnp.float32),
            jnp.asarray(r.normal(size=(B, t, KV_HEADS, D)), jnp.float32))


def _dense(q, k, v, seg, **kw):
    window = kw.pop("sliding_window", None)
    mask = layers.attention_mask(None if seg is None else jnp.asarray(seg), q.shape[1], sliding_window=window)
    return layers._dense_attention(q, k, v, mask, impl="einsum", **kw)


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_splash_matches_dense_packed_padded_gqa_with_gradients():
    t = 192  # not a multiple of 128: the kernel pads to 256 and drops the extra rows
    q, k, v = _qkv(t)
    seg = jnp.asarray(_segments(t))
    w = jnp.asarray(np.random.default_rng(1).normal(size=(B, t, HEADS, D)), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    splash = jax.jit(lambda q, k, v: splash_attention(q, k, v, seg, interpret=True))
    dense = jax.jit(lambda q, k, v: _dense(q, k, v, seg))
    out, ref = splash(q, k, v), dense(q, k, v)
    chex.assert_shape(out, (B, t, HEADS, D))
    chex.assert_type(out, jnp.float32)
    # Every row, padding rows included: segment 0 attends to earlier padding in both.
    err = _max_err(out, ref)
    print(f"splash forward: max |diff| = {err:.2e}")
    assert err <= FWD_TOL
    grads = jax.jit(jax.grad(loss(lambda q, k, v: splash_attention(q, k, v, seg, interpret=True)), (0, 1, 2)))(q, k, v)
    refs = jax.jit(jax.grad(loss(lambda q, k, v: _dense(q, k, v, seg)), (0, 1, 2)))(q, k, v)
    for name, g, r in zip(("dq", "dk", "dv"), grads, refs):
        chex.assert_equal_shape([g, r])
        rel = _max_err(g, r) / float(jnp.max(jnp.abs(r)))
        print(f"splash {name}: max |diff| / max |ref| = {rel:.2e}")
        assert rel <= GRAD_RTOL, name


def test_splash_sliding_window_soft_cap_scale_without_segments():
    # Gemma 2's attention (window, soft cap, its own scale) on unpacked rows: the kernel without
    # SegmentIds. t = 256: no padding, one 256 block.
    t = 256
    q, k, v = _qkv(t, seed=2)
    kw = dict(sliding_window=40, logits_soft_cap=5.0, scale=0.1)
    out = jax.jit(lambda q, k, v: splash_attention(q, k, v, None, interpret=True, **kw))(q, k, v)
    err = _max_err(out, _dense(q, k, v, None, **kw))
    print(f"splash window+cap: max |diff| = {err:.2e}")
    assert err <= FWD_TOL


def test_cudnn_call_matches_dense():
    # The arguments cudnn_attention gives jax.nn.dot_product_attention (causal flag, the [b, 1, t, s]
    # same-segment mask, the window), run by XLA: cuDNN itself needs a GPU.
    t = 96
    q, k, v = _qkv(t, seed=3)
    seg = jnp.asarray(_segments(t))
    for s, kw in ((seg, {}), (seg, {"sliding_window": 17, "scale": 0.2}), (None, {})):
        out = jax.jit(functools.partial(cudnn_attention, segment_ids=s, implementation="xla", **kw))(q, k, v)
        ref = jax.jit(functools.partial(_dense, seg=s, **kw))(q, k, v)
        assert _max_err(out, ref) <= FWD_TOL, kw


TINY = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512}


def test_model_with_splash_matches_default_path():
    """segment_ids reach the kernel through CausalLM -> DecoderLayer -> Attention (packed + padded)."""
    t = 96
    ids = jnp.asarray(np.random.default_rng(4).integers(1, 128, (B, t)), jnp.int32)
    seg = jnp.asarray(_segments(t))
    logits = {}
    for impl in ("splash", "auto"):  # "auto" on CPU: the XLA path, as before the kernels existed
        model = CausalLM(ModelConfig.from_hf(TINY, attention_impl=impl, remat_policy="full"),
                         dtype=jnp.float32, rngs=nnx.Rngs(0))
        logits[impl] = model(ids, segment_ids=seg)
    real = np.asarray(seg) > 0
    err = _max_err(np.asarray(logits["splash"])[real], np.asarray(logits["auto"])[real])
    print(f"model logits splash vs XLA path: max |diff| = {err:.2e}")
    assert err <= 1e-4
    assert _max_err(logits["splash"], logits["auto"]) <= 1e-4  # padding rows too


def test_dispatch_rules():
    q = jnp.zeros((1, 8, HEADS, D), jnp.bfloat16)
    assert jax.default_backend() == "cpu"
    assert layers.attention_kernel("auto", q) is None  # CPU keeps the XLA path
    assert layers.attention_kernel("jax", q) is None
    assert layers.attention_kernel("splash", q) == "splash"
    assert layers.attention_kernel("cudnn", q.astype(jnp.float32)) is None  # cuDNN has no f32 kernel
    with pytest.raises(ValueError, match="needs a GPU"):
        layers.attention_kernel("cudnn", q)
    with pytest.raises(UserError, match="attention_impl"):
        ModelConfig.from_hf(TINY, attention_impl="flash")


def test_trainer_config_names_attention_impl():
    from configs.sft import get_config
    from qlora_jax.train.config import ConfigError, RunConfig, validate_config

    cfg = get_config()
    cfg.data.train = "x.jsonl"
    cfg.model.attention_impl = "splash"
    assert RunConfig.from_config(cfg).model.attention_impl == "splash"
    cfg.model.attention_impl = "flash"
    with pytest.raises(ConfigError, match=r"config.model.attention_impl='flash'"):
        validate_config(cfg)
