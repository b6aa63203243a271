"""The machine's matmul ceiling: one large jit-compiled matmul, timed.

``n x n @ n x n`` (``spec["ceiling_n"]``: 2048 on CPU, 8192 on accelerators by default) in
float32 on CPU and bfloat16 (float32 accumulation) on GPU/TPU, unless ``spec["dtype"]`` names
one. Compiled once, run twice untimed, then ``spec["ceiling_reps"]`` times, each synced.
FLOPs = 2·n³ per call. The record gives the best and the median GFLOP/s; the bench divides by
the best (a ceiling), which makes "% of ceiling" conservative on a loaded machine.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main() -> None:
    spec = common.read_spec()
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    dtype = common.jax_dtype_name(spec, device.platform)
    n = spec.get("ceiling_n") or (2048 if device.platform == "cpu" else 8192)
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    compiled = matmul.lower(a, b).compile()
    for _ in range(2):
        compiled(a, b).block_until_ready()
    seconds = []
    for _ in range(spec.get("ceiling_reps", 10)):
        t0 = time.perf_counter()
        compiled(a, b).block_until_ready()
        seconds.append(time.perf_counter() - t0)
    flops = 2.0 * n**3
    Path(spec["out"]).write_text(__import__("json").dumps({
        "side": "ceiling", "platform": device.platform, "device": device.device_kind, "dtype": dtype, "n": n,
        "seconds": seconds, "best_gflops": flops / min(seconds) / 1e9,
        "median_gflops": flops / statistics.median(seconds) / 1e9, "loadavg_end": common.loadavg(),
    }, indent=1))


if __name__ == "__main__":
    main()
