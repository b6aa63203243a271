"""The training step compiled for a TPU topology (v5e:2x2, no hardware), in the second venv.

libtpu lives in ``.venv-tpu`` (``make .venv-tpu``), not in the test venv, so the compile runs there
in a subprocess (``tests/_tpu_compile_worker.py``). Without ``.venv-tpu`` the test is skipped,
unless ``QLORA_REQUIRE_TPU_COMPILE`` is set (CI that builds the venv), where it fails.

Checked against independent figures: the per-chip arguments against the storage arithmetic of
the sharded state (NF4 codes and scales, bf16 embeddings and norms, f32 adapters and two AdamW
moments, the int32 batch); temporaries against a bound from the activations; and in the
optimized HLO, outside fused computations (the buffers XLA allocates), no float ``[out, in]``
decoder weight (the NF4 decode is fused into the matmuls) and no ``[..., seq, seq]`` attention
scores (blockwise causal attention), and no relayout copy of the frozen uint8 arrays.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _support import compile_in_venv  # noqa: E402
from _tpu_compile_worker import PER_CHIP, SEQ, TINY  # noqa: E402


def _compile(mesh: str) -> dict:
    return compile_in_venv(".venv-tpu", "_tpu_compile_worker.py", mesh, require_env="QLORA_REQUIRE_TPU_COMPILE",
                           missing="the TPU compiler is not installed", ALLOW_MULTIPLE_LIBTPU_LOAD="1")


def _expected_argument_bytes(chips_batch: int, chips_weights: int) -> int:
    """Per-chip bytes of the step's arguments from the storage arithmetic (no padding)."""
    h, inter, L, V = TINY["hidden_size"], TINY["intermediate_size"], TINY["num_hidden_layers"], TINY["vocab_size"]
    q = TINY["num_attention_heads"] * TINY["head_dim"]
    kv = TINY["num_key_value_heads"] * TINY["head_dim"]
    shapes = [(q, h), (kv, h), (kv, h), (h, q), (inter, h), (inter, h), (h, inter)]
    r = 8
    # packed codes + 8-bit absmax + f32 nested absmax and offset
    nf4 = sum(o * i // 2 + o * i // 64 + 4 * -(-(o * i // 64) // 256) + 4 for o, i in shapes) * L
    dense = (2 * V * h + (2 * L + 1) * h) * 2  # embeddings, lm_head, norms in bf16
    adapters = sum(r * (o + i) for o, i in shapes) * L * 4 * 3  # f32 adapters + 2 AdamW moments
    batch = 5 * PER_CHIP * SEQ * 4  # five int32 [rows, seq] arrays, rows split over chips
    return (nf4 + dense + adapters) // chips_weights + batch


@pytest.fixture(scope="module")
def data_parallel() -> dict:
    return _compile("4,1,1")  # one compile (today's defaults: Pallas NF4 matmul, splash) for the tests below


@pytest.mark.slow
def test_v5e_data_parallel_step_memory_and_hlo(data_parallel):
    row = data_parallel
    assert row["platform"] == "tpu"
    expected = _expected_argument_bytes(4, 1)  # data parallel: weights replicated on every chip
    # TPU pads small arrays to its (8, 128) tiles: allow that much on top, never less than the state.
    assert expected <= row["arguments"] <= 1.6 * expected, (row["arguments"], expected)
    # Activations at one 1024-token sequence per chip are a few MiB; 64 MiB catches a decoded
    # weight kept per layer or a [b, h, s, s] f32 score tensor (4 heads x 4 MiB each).
    assert 0 < row["temporaries"] < 64 * 2**20, row["temporaries"]
    assert row["weight_buffers"] == [], row["weight_buffers"]
    assert row["score_buffers"] == [], row["score_buffers"]
    # The frozen state in XLA-chosen layouts (the trainer's TPU path): no per-step relayout copy of
    # the NF4 codes or 8-bit absmax (the default layouts give 4 for this model: codes and absmax).
    assert row["frozen_layout"] == "auto"
    assert row["u8_copies"] == [], row["u8_copies"]


@pytest.mark.slow
def test_v5e_training_step_with_splash_has_no_score_buffers(data_parallel):
    """attention_impl "auto" is splash on a TPU target. (The XLA path's blockwise attention,
    compiled the same way, allocates [b, heads, 512, <=1024] f32 scores, which attention_scores
    lists: 2026-12-01, f32[3, 1, 2, 512, 1024] on a CPU target.)"""
    row = data_parallel
    assert row["platform"] == "tpu" and row["attention_impl"] == "auto", row
    # Mosaic kernels (forward, its rematerialized copy, dq, dkv) and no score-shaped buffer at all.
    assert row["splash_calls"] >= 3 and row["tpu_custom_calls"] >= row["splash_calls"], row
    assert row["attention_scores"] == [] and row["score_buffers"] == [], row
    # 21.5 MiB measured (2026-12-01); one layer's f32 scores [1, 6, 1024, 1024] alone would add 24 MiB.
    assert 0 < row["temporaries"] < 32 * 2**20, row["temporaries"]


@pytest.mark.slow
def test_v5e_planner_counts_offloaded_optimizer_state_in_host_memory():
    """``optim.offload``: the AdamW moments live in pinned host memory. XLA:TPU reports them as host
    arguments, which the planner shows apart from the chip's memory: exactly the two f32 moments of
    every adapter (plus the step counts), and the chip's arguments no longer include them."""
    row = compile_in_venv(".venv-tpu", "_offload_compile_worker.py", "4,1,1 tpu",
                          require_env="QLORA_REQUIRE_TPU_COMPILE", missing="the TPU compiler is not installed",
                          ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    h, inter, L = TINY["hidden_size"], TINY["intermediate_size"], TINY["num_hidden_layers"]
    q, kv = TINY["num_attention_heads"] * TINY["head_dim"], TINY["num_key_value_heads"] * TINY["head_dim"]
    moments = sum(8 * (o + i) for o, i in [(q, h), (kv, h), (kv, h), (h, q), (inter, h), (inter, h), (h, inter)])
    moments *= L * 4 * 2  # r=8, f32, AdamW's mu and nu
    assert moments <= row["host_arguments"] <= moments + 4096, (row["host_arguments"], moments)
    on_device = _expected_argument_bytes(4, 1) - moments
    assert on_device <= row["arguments"] <= 1.6 * on_device, (row["arguments"], on_device)
