"""The training step compiled for 4 NVIDIA H100s (a compile-only CUDA topology, no GPU), in the CUDA venv.

The jax CUDA plugin lives in ``.venv-cuda`` (``make .venv-cuda``; docs/gpu_aot.md), not in the test
venv, so the compile runs there in a subprocess (``tests/_gpu_compile_worker.py``). Without
``.venv-cuda`` the test is skipped, unless ``QLORA_REQUIRE_GPU_COMPILE`` is set (CI that builds the
venv), where it fails.

Checked against independent figures: the per-GPU arguments against the storage arithmetic of the
sharded state (NF4 codes and scales, bf16 embeddings and norms, f32 adapters and two AdamW moments,
the int32 batch; XLA:GPU pads nothing); temporaries against a bound from the activations; and in
the optimized HLO, outside fused computations (the buffers XLA allocates), no float decoder weight
``[out, in]`` (or a scanned stack of them, ``[layers, out, in]``) and no ``[..., seq, seq]``
attention scores (blockwise causal attention). A tiny Qwen3-MoE step compiles too (its expert sort
is XLA's, not CUB's), its arguments equal to the MoE's storage arithmetic.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _support import compile_in_venv  # noqa: E402
from _tpu_compile_worker import PER_CHIP, SEQ, TINY  # noqa: E402


def _compile(mesh: str) -> dict:
    return compile_in_venv(".venv-cuda", "_gpu_compile_worker.py", mesh, require_env="QLORA_REQUIRE_GPU_COMPILE",
                           missing="the jax CUDA plugin is not installed", JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1")


def _state_bytes() -> int:
    """Bytes of the step's state (frozen base, adapters, AdamW moments) from the storage arithmetic."""
    h, inter, L, V = TINY["hidden_size"], TINY["intermediate_size"], TINY["num_hidden_layers"], TINY["vocab_size"]
    q = TINY["num_attention_heads"] * TINY["head_dim"]
    kv = TINY["num_key_value_heads"] * TINY["head_dim"]
    shapes = [(q, h), (kv, h), (kv, h), (h, q), (inter, h), (inter, h), (h, inter)]
    r = 8
    # packed codes + 8-bit absmax + f32 nested absmax and offset
    nf4 = sum(o * i // 2 + o * i // 64 + 4 * -(-(o * i // 64) // 256) + 4 for o, i in shapes) * L
    dense = (2 * V * h + (2 * L + 1) * h) * 2  # embeddings, lm_head, norms in bf16
    adapters = sum(r * (o + i) for o, i in shapes) * L * 4 * 3  # f32 adapters + 2 AdamW moments
    return nf4 + dense + adapters


BATCH_BYTES = 5 * PER_CHIP * SEQ * 4  # five int32 [rows, seq] arrays, one row per GPU
SCALARS = 4096  # the PRNG key, the optimizer's step count and schedule state: a few bytes


@pytest.fixture(scope="module")
def data_parallel() -> dict:
    return _compile("4,1,1")  # one compile for the tests below


@pytest.mark.slow
def test_h100_data_parallel_step_memory_and_hlo(data_parallel):
    row = data_parallel
    assert row["platform"] == "gpu" and row["device_kind"] == "NVIDIA H100 80GB HBM3", row
    expected = _state_bytes() + BATCH_BYTES  # data parallel: the state is replicated on every GPU
    # XLA:GPU keeps arrays dense (no TPU tiles): the arguments are the state, byte for byte.
    assert expected <= row["arguments"] <= expected + SCALARS, (row["arguments"], expected)
    # Activations at one 1024-token sequence per GPU are a few MiB; XLA:GPU's temporaries also hold
    # the f32 gradients of the adapters and the chunked logits. 64 MiB catches a whole decoded
    # weight stack kept alive or [b, h, s, s] f32 scores of all layers (6 heads x 4 MiB each per layer).
    assert 0 < row["temporaries"] < 64 * 2**20, row["temporaries"]
    assert row["weight_buffers"] == [], row["weight_buffers"]
    # No [b, heads, s, s] scores. With cuDNN (the default where jax finds the library) packed
    # segments travel as one [b, 1, s, s] same-segment mask per row, which is not per head.
    assert row["attention_scores"] == [], row["attention_scores"]
    assert all(b.split("[")[1].startswith(("1,1,", "1, 1,")) for b in row["mask_buffers"]), row["mask_buffers"]


@pytest.mark.slow
def test_h100_no_hoisted_nf4_code_value_broadcasts(data_parallel):
    # The NF4 code values as a full-size f32 constant per code and weight shape, hoisted out of the
    # layer scan: with the jnp.where decode 64 of them for the tiny model, ~3.8 GiB of the (8,1,1)
    # step's 5.3 GiB of temporaries per GPU at 8B (docs/gpu_aot.md). quant.nf4.code_values now
    # broadcasts nothing.
    assert data_parallel["level_broadcasts"] == [], sorted(set(data_parallel["level_broadcasts"]))


@pytest.mark.slow
def test_h100_training_step_with_cudnn_has_no_score_buffers(data_parallel):
    """attention_impl "auto" is cuDNN on a GPU target where jax finds the library (CI installs the
    nvidia-cudnn-cu12 wheel into .venv-cuda: `make .venv-cuda`)."""
    row = data_parallel
    if not row["cudnn_found"]:
        if os.environ.get("QLORA_REQUIRE_GPU_COMPILE"):
            pytest.fail("cuDNN not found in .venv-cuda: rebuild it with `make .venv-cuda`")
        pytest.skip("cuDNN not found in .venv-cuda (pip install nvidia-cudnn-cu12)")
    assert row["platform"] == "gpu" and row["attention_impl"] == "auto", row
    # cuDNN's fused forward and backward per layer step; no [b, heads, t, s] buffer. The packed
    # batch's same-segment mask [b, 1, t, s] (a bias to cuDNN) is the one t x s array (mask_buffers).
    assert row["cudnn_calls"] >= 2, row
    assert row["attention_scores"] == [], row
    assert all("[1, 1, " in m for m in row["mask_buffers"]), row["mask_buffers"]


@pytest.mark.slow
def test_h100_planner_says_offload_is_not_compiled():
    """Compile-only GPU devices have no host memory space (``with_memory_kind("pinned_host")``
    gives none), so ``optim.offload`` cannot be compiled for them: the planner says so in its row
    instead of presenting on-device figures as offloaded ones."""
    row = compile_in_venv(".venv-cuda", "_offload_compile_worker.py", "4,1,1 gpu",
                          require_env="QLORA_REQUIRE_GPU_COMPILE", missing="the jax CUDA plugin is not installed",
                          JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1")
    assert row["note"].startswith("optim.offload not compiled"), row
    assert row["host_arguments"] == 0 and row["arguments"] > 0, row


def _nf4_bytes(out_f: int, in_f: int) -> int:
    """One NF4 + double-quantized [out, in] matrix: packed codes, 8-bit absmax, f32 nested absmax, offset."""
    return out_f * in_f // 2 + out_f * in_f // 64 + 4 * -(-(out_f * in_f // 64) // 256) + 4


@pytest.mark.slow
def test_h100_moe_step_compiles_with_xla_sort():
    """Qwen3-MoE sorts its token-expert assignments by expert. At 32,768 assignments XLA:GPU picks a
    CUB radix sort, whose scratch size it asks the CUDA runtime for while compiling: a compile-only
    target failed there ("Error loading CUDA libraries", the planner's one line for Qwen3-30B-A3B).
    The planner compiles GPU steps with XLA's own sort; the arguments are the MoE's state byte for
    byte (data parallel: replicated; NF4 per expert matrix, as bitsandbytes quantizes each)."""
    from _gpu_compile_worker import MOE_EXPERT_PARAMS, MOE_PER_CHIP, TINY_MOE

    row = compile_in_venv(".venv-cuda", "_gpu_compile_worker.py", "4,1,1", require_env="QLORA_REQUIRE_GPU_COMPILE",
                          missing="the jax CUDA plugin is not installed", JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1",
                          QLORA_COMPILE_MODEL="qwen3_moe")
    assert row["platform"] == "gpu", row
    c = TINY_MOE
    h, e, inter, V = c["hidden_size"], c["num_experts"], c["moe_intermediate_size"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    # Each GPU sorts its own batch shard's assignments, not the whole batch's (4 x as many).
    assert row["sorts_1d"] == [MOE_PER_CHIP * SEQ * c["num_experts_per_tok"]] and row["cub_calls"] == 0, row
    attention = [(q, h), (kv, h), (kv, h), (h, q)]
    nf4 = sum(_nf4_bytes(o, i) for o, i in attention) + e * (_nf4_bytes(2 * inter, h) + _nf4_bytes(h, inter))
    # embeddings, lm_head, router [E, hidden], input/post-attention/final norms, q/k norms: bf16
    dense = 2 * (2 * V * h + e * h + 3 * h + 2 * c["head_dim"])
    r = 8  # all-linear = the four attention projections; both expert tensors per expert (target_parameters)
    adapters = r * (sum(o + i for o, i in attention) + e * ((h + 2 * inter) + (inter + h)))
    assert len(MOE_EXPERT_PARAMS) == 2 and c["num_hidden_layers"] == 1
    expected = nf4 + dense + adapters * 4 * 3 + BATCH_BYTES * MOE_PER_CHIP // PER_CHIP  # f32 adapters + two AdamW moments
    assert expected <= row["arguments"] <= expected + SCALARS, (row["arguments"], expected)
    assert row["temporaries"] > 0, row
