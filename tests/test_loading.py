"""Loading SmolLM2-135M-Instruct: host memory, placement on a mesh, and the compact GGUF parse.

* Peak RSS of ``load_model(..., quantize="nf4")`` in a fresh process, above a process that only
  imports jax and the loader, stays below the model's float32 size (``bench/load_rss.py`` prints
  the full breakdown).
* On 8 fake CPU devices (subprocess), ``build_model`` puts every array on the mesh exactly once,
  with the ``PartitionSpec`` that ``qlora_jax.train.sharding`` (``spec_for`` of
  ``logical_axes_for``) asks for, and the arrays end up with those shardings.
* The compact GGUF metadata reader reads every field and tensor exactly as ``gguf.GGUFReader``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import _smollm2 as smol
from _support import require

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("load_rss", REPO / "bench/load_rss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nf4_load_peak_rss_stays_below_the_float32_model():
    smol.smol_path()
    bench = _bench()
    sizes = bench.model_sizes("smollm2-135m-instruct")
    baseline = bench.run_case("baseline", "smollm2-135m-instruct")["peak_rss_bytes"]
    nf4 = bench.run_case("nf4", "smollm2-135m-instruct")
    above = nf4["peak_rss_bytes"] - baseline
    mib = 2**20
    print(f"nf4 load: peak {nf4['peak_rss_bytes'] / mib:.0f} MiB, {above / mib:.0f} MiB above baseline "
          f"{baseline / mib:.0f} MiB; quantized {sizes['quantized_bytes'] / mib:.0f} MiB + largest f32 tensor "
          f"{sizes['largest_f32_tensor_bytes'] / mib:.0f} MiB + mapped file {sizes['file_bytes'] / mib:.0f} MiB; "
          f"f32 model {sizes['f32_bytes'] / mib:.0f} MiB")
    assert nf4["device_bytes"] == sizes["quantized_bytes"]  # what stays: 4-bit linears + f32 rest
    # Measured 394-406 MiB: quantized 160 + one f32 tensor 108 + mapped GGUF 94 + ~40 (compiled
    # quantizers, metadata). The float32 model alone would be 513 MiB.
    assert above < sizes["f32_bytes"]


def test_build_model_puts_each_array_straight_on_its_shard():
    smol.smol_path()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(REPO / "tests/_load_mesh_worker.py"), "smollm2-135m-instruct"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    leaves, puts = result["leaves"], result["puts"]
    assert len(leaves) == 46  # embeddings, 2 norms + final norm, 7 x (4 NF4 fields + lora_a + lora_b)
    for leaf in leaves:
        assert leaf["spec"] == leaf["expected"], leaf
        assert leaf["devices"] == 8 and leaf["shard_shape"] == leaf["expected_shard_shape"], leaf
    # Every array was put on the mesh once, with its final spec: nothing went to one device first.
    assert len(puts) == len(leaves) and all(spec is not None for _, spec in puts)
    assert sorted(map(str, puts)) == sorted(str([leaf["shape"], leaf["spec"]]) for leaf in leaves)
    sharded = {leaf["name"]: leaf["shard_shape"] for leaf in leaves}
    assert sharded["embed_tokens/weight"] == [49152 // 2, 576 // 2]  # vocab over tensor, embed over fsdp
    assert sharded["layers/mlp/up_proj/weight/packed"] == [30, 1536 // 2, 288 // 2]


def test_compact_gguf_reader_reads_like_gguf_reader():
    gguf = require("gguf")
    from qlora_jax.checkpoints import gguf_reader

    path = str(smol.smol_path())
    lean, stock = gguf_reader._LeanReader(path), gguf.GGUFReader(path)
    assert list(lean.fields) == list(stock.fields)
    for key, field in stock.fields.items():
        assert lean.fields[key].types == field.types, key
        assert lean.fields[key].contents() == field.contents(), key
    assert lean.fields["tokenizer.ggml.tokens"].contents(5) == stock.fields["tokenizer.ggml.tokens"].contents(5)
    assert lean.data_offset == stock.data_offset
    for a, b in zip(lean.tensors, stock.tensors, strict=True):
        assert (a.name, a.tensor_type, a.shape.tolist(), a.n_bytes, a.data_offset) == \
               (b.name, b.tensor_type, b.shape.tolist(), b.n_bytes, b.data_offset)
    assert isinstance(gguf_reader.open_gguf(path), gguf_reader._LeanReader)
