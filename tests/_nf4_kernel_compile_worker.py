"""Run by tests/test_nf4_kernel.py inside .venv-tpu (libtpu) or .venv-cuda (the CUDA plugin): compile
one frozen 4-bit matmul, forward and backward (dx), for a v5e:2x2 topology (4 chips) or 8 H100s, no
hardware, inside ``shard_map`` (Mosaic kernels are not partitioned automatically), once with the
Pallas kernel and once with the XLA path, and print one JSON line (keyed by implementation) with the
per-device memory figures and the float buffers of the weight's shape in the optimized HLO.

    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 .venv-tpu/bin/python tests/_nf4_kernel_compile_worker.py tpu:OUT,IN
    JAX_PLATFORMS=cpu .venv-cuda/bin/python tests/_nf4_kernel_compile_worker.py gpu:OUT,IN
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

ROWS_PER_CHIP = 1024  # tokens per chip: one 1024-token sequence


def main() -> None:
    backend, shape_arg = (sys.argv[1] if len(sys.argv) > 1 else "tpu:14336,4096").split(":")
    out_f, in_f = (int(d) for d in shape_arg.split(","))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import dataclasses

    import jax
    import jax.numpy as jnp
    from _tpu_compile_worker import non_fused_shapes
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from qlora_jax.kernels.nf4_matmul import nf4_matmul
    from qlora_jax.models.layers import frozen_matmul
    from qlora_jax.quant import quantize_4bit
    from qlora_jax.train.aot import TARGETS, target_devices

    if backend == "tpu":
        target = dataclasses.replace(TARGETS["v5e-8"], name="v5e-4", topology="v5e:2x2", chips=4)
    else:
        target = TARGETS["h100x8"]
    devices = target_devices(target)
    chips = len(devices)
    mesh = Mesh(devices, ("data",))
    w_abs = jax.eval_shape(lambda: quantize_4bit(jnp.zeros((out_f, in_f), jnp.bfloat16)))
    w_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())), w_abs)
    x_abs = jax.ShapeDtypeStruct((chips * ROWS_PER_CHIP, in_f), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
    g_abs = jax.ShapeDtypeStruct((chips * ROWS_PER_CHIP, out_f), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
    impls = {"pallas": lambda x, w: nf4_matmul(x, w, False, backend), "xla": frozen_matmul}
    halves = {(out_f, in_f), (in_f, out_f), (out_f, in_f // 2), (in_f // 2, out_f)}
    report = {}
    for name, matmul in impls.items():
        def step(x, w, g, matmul=matmul):
            y, pull = jax.vjp(lambda x: matmul(x, w), x)
            return y, pull(g)[0]

        sharded = jax.shard_map(step, mesh=mesh, in_specs=(P("data"), P(), P("data")),
                                out_specs=(P("data"), P("data")), check_vma=False)
        t0 = time.perf_counter()
        compiled = jax.jit(sharded).lower(x_abs, w_abs, g_abs).compile()
        seconds = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        hlo = compiled.as_text()
        shapes = non_fused_shapes(hlo)
        weight_buffers = sorted({f"{t}{list(s)}" for t, s, _ in shapes
                                 if t in ("f32", "bf16", "f16") and len(s) >= 2 and tuple(s[-2:]) in halves})
        report[name] = {
            "shape": [out_f, in_f], "compile_s": round(seconds, 1),
            "arguments": mem.argument_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
            "outputs": mem.output_size_in_bytes, "weight_buffers": weight_buffers,
            "custom_calls": len(re.findall(r'custom_call_target="(?:tpu_custom_call|__gpu\$xla\.gpu\.triton)"', hlo)),
            "platform": devices[0].platform,
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
