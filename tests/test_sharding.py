"""Training under mesh sharding on 8 fake CPU devices equals single-device training; so does
keeping the optimizer state in pinned host memory (the paged-optimizer analog)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from _support import require

from qlora_jax.train import sharding

REPO = Path(__file__).resolve().parents[1]
require("torch")
from tests.test_train import tiny_model_dir  # noqa: E402,F401  (fixture)


def test_mesh_and_offload_match_single_device(tiny_model_dir):  # noqa: F811
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(REPO / "tests/_mesh_worker.py"), str(tiny_model_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    single = res["single"]
    for name in ("2x2x2", "8x1x1", "1x1x8"):
        np.testing.assert_allclose(res[name]["losses"], single["losses"], rtol=2e-5, err_msg=name)
        np.testing.assert_allclose(res[name]["lora_sum"], single["lora_sum"], rtol=1e-4, err_msg=name)
    # Frozen NF4 weights really are sharded on meshes with fsdp/tensor axes, and not on one device.
    assert res["2x2x2"]["sharded_frozen_leaves"] > 0 and res["1x1x8"]["sharded_frozen_leaves"] > 0
    assert single["sharded_frozen_leaves"] == 0
    # Optimizer state offloaded to pinned host memory: same results, state lives on the host.
    assert res["single_offload"]["opt_memory_kinds"] == ["pinned_host"]
    assert single["opt_memory_kinds"] == ["device"]
    np.testing.assert_array_equal(res["single_offload"]["losses"], single["losses"])
    assert res["single_offload"]["lora_sum"] == single["lora_sum"]


def test_logical_axes_table():
    """Column-parallel q/k/v/gate/up, row-parallel o/down; adapters follow their weight."""
    la = sharding.logical_axes_for
    assert la("layers/self_attn/q_proj/weight/packed", (30, 576, 288)) == (None, "heads", "embed")
    assert la("layers/mlp/down_proj/weight/absmax", (30, 576, 24)) == (None, "embed", "mlp")
    assert la("layers/mlp/up_proj/lora_a", (30, 16, 576)) == (None, "rank", "embed")
    assert la("layers/mlp/up_proj/lora_b", (30, 1536, 16)) == (None, "mlp", "rank")
    assert la("layers/self_attn/k_proj/weight/nested_absmax", (30, 4)) == (None, "blocks")
    assert la("embed_tokens/weight", (49152, 576)) == ("vocab", "embed")
    assert la("norm/weight", (576,)) == (None,)
