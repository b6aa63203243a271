"""GRPO's rollout sampler with ``grpo.dense_sampling`` on and off: the same tokens.

``dense_sampling=True`` decodes from a copy of the frozen NF4 base dequantized once to the compute
dtype; ``False`` dequantizes every weight inside every matmul. Both decode the same 4-bit codes to
the same values (one float32 product rounded once to the dtype) and run the same jitted
prefill/decode with the same PRNG keys, so in float32 the logits are equal bit for bit and the
sampled token ids are equal: greedy and seeded sampling (temperature, top-k, top-p) alike. In
bfloat16 the quantized path decodes inside the matmul (another summation order): the logits agree
to bf16 rounding and the draws of this model still agree token for token. Checked on a
2-layer random LLaMA in NF4 with non-zero adapters, in float32 and (marked slow: CPU bfloat16
is emulated) bfloat16 compute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _support import write_tiny_llama
from flax import nnx

from qlora_jax.checkpoints import gguf_tokenizer, resolve_builtin
from qlora_jax.checkpoints.load import load_model
from qlora_jax.inference.generate import SamplingParams
from qlora_jax.lora import LoraConfig
from qlora_jax.quant import Quant4bit
from qlora_jax.train import loop
from qlora_jax.train.rollout import Sampler

PROMPTS = [[1, 504, 2393, 314, 260], [1, 19, 7, 1024, 9, 33, 870, 41], [1, 76]]  # different lengths
NEW_TOKENS = 12
SAMPLINGS = {
    "greedy": SamplingParams(),
    "t0.8": SamplingParams(temperature=0.8, seed=3),  # GRPO's default: plain temperature sampling
    "t1-topk50-topp0.9": SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=11),
}


@pytest.fixture(scope="module")
def tok():
    return gguf_tokenizer(resolve_builtin("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    # embeddings of std 0.1 (tied): greedy has a clear winner, sampling at temperature 1 a wide spread
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama_sampling"), tok, embed_std=0.1)


@pytest.fixture(scope="module", params=["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def policy(request, model_dir):
    """(graphdef, lora, rest, dtype): the tiny model in NF4 with adapters B != 0."""
    dtype = request.param
    model, _ = load_model(str(model_dir), quantize="nf4", dtype=dtype, lora=LoraConfig(r=4, alpha=8.0),
                          with_tokenizer=False)
    for i, view in enumerate(model.iter_linears()):
        b = view.linear.lora_b.get_value()
        view.linear.lora_b.set_value(jax.random.normal(jax.random.key(i), b.shape, b.dtype) * 0.05)
    graphdef, lora, rest = loop.split_model(model)
    return graphdef, lora, rest, jnp.dtype(dtype)


def _is_quant(x):
    return isinstance(x, Quant4bit)


def test_dense_copy_replaces_every_4bit_weight(policy, tok):
    graphdef, lora, rest, dtype = policy
    quantized = jax.tree.leaves(Sampler(graphdef, rest, tok, dense=False, dtype=dtype).rest, is_leaf=_is_quant)
    dense = jax.tree.leaves(Sampler(graphdef, rest, tok, dense=True, dtype=dtype).rest, is_leaf=_is_quant)
    assert len(quantized) == len(dense) and any(map(_is_quant, quantized)) and not any(map(_is_quant, dense))
    for q, d in zip(quantized, dense):
        if _is_quant(q):  # stacked layers stay stacked: [layers, out, in]
            assert d.dtype == dtype and d.shape[-2:] == tuple(q.shape[-2:]) and d.size == q.packed.size * 2


def _logits(graphdef, lora, rest, ids):
    model = nnx.merge(graphdef, lora, rest)
    hidden = model.hidden_states(jnp.asarray(ids))  # [1, seq, hidden]
    return np.asarray(jnp.einsum("bsh,vh->bsv", hidden.astype(jnp.float32),
                                 model.lm_head_weight().astype(jnp.float32)))


def test_logits_agree(policy, tok):
    graphdef, lora, rest, dtype = policy
    ids = np.asarray([PROMPTS[1]], np.int32)
    quantized = _logits(graphdef, lora, Sampler(graphdef, rest, tok, dense=False, dtype=dtype).rest, ids)
    dense = _logits(graphdef, lora, Sampler(graphdef, rest, tok, dense=True, dtype=dtype).rest, ids)
    if dtype == jnp.float32:
        # Both paths round the same float32 products once and XLA keeps the dot the same: the
        # logits are bit-identical, which is why the draws agree.
        np.testing.assert_array_equal(dense, quantized)
    else:
        # bf16/f16 compute: the frozen matmul decodes the 4-bit weight inside the matmul as two
        # nibble halves (x[..., 0::2] @ hi^T + x[..., 1::2] @ lo^T, float32 accumulation), the
        # dense copy runs one dot: the same weights, another summation order, so the hidden states
        # differ by bf16 roundings. Measured 2026-11-30: max |diff| 1.3e-4, max |logit| 7.0. The
        # bound, 2^-8 of the largest logit, is bf16's precision (8 significant bits).
        worst, scale = float(np.abs(dense - quantized).max()), float(np.abs(dense).max())
        print(f"bf16 logits: max |dense - quantized| {worst:.2e}, max |logit| {scale:.2e}")
        assert worst <= 2**-8 * scale, (worst, scale)


def test_dense_and_quantized_sampling_draw_the_same_tokens(policy, tok):
    graphdef, lora, rest, dtype = policy
    samplers = {dense: Sampler(graphdef, rest, tok, dense=dense, dtype=dtype) for dense in (False, True)}
    drawn = {}
    for name, sampling in SAMPLINGS.items():
        out = {dense: s.generate(lora, PROMPTS, max_new_tokens=NEW_TOKENS, sampling=sampling)
               for dense, s in samplers.items()}
        assert out[True] == out[False], name  # token ids, texts, truncation flags
        drawn[name] = out[True][0]
        assert all(len(t) >= 1 for t in drawn[name])
    # the sampled runs are real draws: they differ from greedy and from each other
    assert drawn["t0.8"] != drawn["greedy"] and drawn["t1-topk50-topp0.9"] not in (drawn["greedy"], drawn["t0.8"])
