"""The analytic FLOP count of bench/train_step.py against XLA's own count of our model.

XLA's ``cost_analysis()["flops"]`` counts every dot as 2·m·n·k and every elementwise op too
(norms, softmax, rotary, SiLU: a few percent for a small model), and it counts a loop body once,
whatever its trip count -- so the model here has one decoder layer (our layers are a scan).
Reference = the compiled forward (logits) and the compiled value-and-gradient with respect to
the LoRA adapters, unquantized f32 weights (NF4 dequantization would add elementwise FLOPs).
Tolerance: XLA's count must lie within [1.00, 1.03] x the analytic one (measured: 1.006
forward, 1.015 training); in training, XLA leaves out layer 0's q/k/v input gradient, which
nothing upstream needs in a single-layer program and which the analytic count reports apart.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "_train_sides"))

from flops import step_flops  # noqa: E402

from qlora_jax.lora import LoraConfig, LoRAParam  # noqa: E402
from qlora_jax.models import CausalLM, ModelConfig  # noqa: E402

TINY = dict(model_type="llama", vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5, rope_theta=1e4,
            max_position_embeddings=512, tie_word_embeddings=True)
BATCH, SEQ, RANK = 2, 128, 8


@pytest.fixture(scope="module")
def xla_flops():
    model = CausalLM(ModelConfig(**TINY), lora=LoraConfig(r=RANK, alpha=16.0), dtype="float32",
                     param_dtype="float32", rngs=nnx.Rngs(0))
    graphdef, lora, rest = nnx.split(model, LoRAParam, ...)
    ids = jnp.zeros((BATCH, SEQ), jnp.int32)
    cotangent = jnp.ones((BATCH, SEQ, TINY["vocab_size"]), jnp.float32)

    def forward(lora, rest, ids):
        return nnx.merge(graphdef, lora, rest)(ids)

    def train(lora, rest, ids, cotangent):  # value too: else XLA drops the forward lm_head
        return jax.value_and_grad(lambda a: jnp.sum(forward(a, rest, ids) * cotangent))(lora)

    fwd = jax.jit(forward).lower(lora, rest, ids).compile().cost_analysis()["flops"]
    trn = jax.jit(train).lower(lora, rest, ids, cotangent).compile().cost_analysis()["flops"]
    return fwd, trn


def test_forward_flops_match_xla(xla_flops):
    analytic = step_flops(TINY, batch=BATCH, seq=SEQ, r=RANK)["forward"]
    assert 1.0 <= xla_flops[0] / analytic <= 1.03, (xla_flops[0], analytic)


def test_training_flops_match_xla(xla_flops):
    f = step_flops(TINY, batch=BATCH, seq=SEQ, r=RANK)
    analytic = f["total"] - f["layer0_qkv_dx"]
    assert 1.0 <= xla_flops[1] / analytic <= 1.03, (xla_flops[1], analytic)


def test_smollm2_figure_in_docs():
    smollm2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                   num_key_value_heads=3, head_dim=64, vocab_size=49152)
    f = step_flops(smollm2, batch=4, seq=256, r=32)
    assert round(f["per_token"] / 1e6) == 650 and round(f["total"] / 1e9) == 665
    # per token = L·(4·P + 6·r·R + 12·S·H·hd) + 4·V·d, written out
    p = 576 * 576 * 2 + 576 * 192 * 2 + 576 * 1536 * 3
    big_r = (576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3
    assert f["per_token"] == 30 * (4 * p + 6 * 32 * big_r + 12 * 256 * 9 * 64) + 4 * 49152 * 576
