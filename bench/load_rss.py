"""Peak host memory (RSS) of loading SmolLM2-135M-Instruct, each case in a fresh process.

    python bench/load_rss.py [--model smollm2-135m-instruct] [--cases baseline,nf4,nf4+tokenizer,none]

Cases (each a new ``python -c`` child). Peak = the child's ``VmHWM`` (``/proc/self/status``), which
equals ``getrusage(RUSAGE_SELF).ru_maxrss`` when the parent is small; Linux folds the *forking
parent's* RSS at fork time into the child's ``ru_maxrss`` across ``exec``, so from a big parent
(e.g. a pytest process holding models) ``ru_maxrss`` reports the parent's size instead. Both are
recorded.

* ``baseline``: imports jax and the loader (``qlora_jax.checkpoints.load``), touches the CPU
  backend -- what any process pays before a weight is read;
* ``nf4``: ``load_model(model, quantize="nf4", with_tokenizer=False)``: the weights alone;
* ``nf4+tokenizer``: the same with the tokenizer (imports transformers, builds the vocabulary);
* ``none``: the weights unquantized (float32), for scale.

Reported next to them: the model's float32 size (parameters x 4 bytes), its quantized size (4-bit
decoder linears with double quantization + float32 embeddings and norms, exactly as stored), the
largest single float32 tensor, and the GGUF file (memory-mapped: its pages count in RSS as they
are read). The loader's contract (``qlora_jax.models.loading``): peak - baseline stays near the
quantized model + one float32 tensor (+ the mapped file), never the float32 model.
A benchmark, not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import jax, jax.numpy as jnp
import qlora_jax
from qlora_jax.checkpoints.load import load_model
jnp.zeros(8).block_until_ready()
case, model = sys.argv[1], sys.argv[2]
info = {}
if case != "baseline":
    quantize, _, extra = case.partition("+")
    m, tok = load_model(model, quantize=None if quantize == "none" else quantize,
                        with_tokenizer=extra == "tokenizer")
    leaves = jax.tree.leaves(m)
    jax.block_until_ready(leaves)
    info["device_bytes"] = int(sum(x.nbytes for x in leaves))
info["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
try:  # peak RSS of this process image alone (see the module docstring)
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    info["peak_rss_bytes"] = int(status.split()[0]) * 1024
except (OSError, IndexError):
    info["peak_rss_bytes"] = info["ru_maxrss_bytes"]
info["seconds"] = time.perf_counter() - t0
print("RESULT " + json.dumps(info))
"""


def run_case(case: str, model: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _CHILD, case, model], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"case {case} failed:\n{out.stderr[-3000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def model_sizes(model: str) -> dict[str, int]:
    from qlora_jax.checkpoints import gguf_tensor_shapes
    from qlora_jax.checkpoints.load import resolve_source
    from qlora_jax.train.footprint import quantized_bytes

    _, path = resolve_source(model)
    numel = {n: math.prod(s) for n, s in gguf_tensor_shapes(path).items()}
    linears = [n for n in numel if n.endswith("_proj.weight")]
    quantized = sum(quantized_bytes(numel[n]) for n in linears)
    other = 4 * sum(v for n, v in numel.items() if n not in linears)
    return {"params": sum(numel.values()), "f32_bytes": 4 * sum(numel.values()),
            "quantized_bytes": quantized + other, "largest_f32_tensor_bytes": 4 * max(numel.values()),
            "file_bytes": os.path.getsize(path)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--cases", default="baseline,nf4,nf4+tokenizer,none")
    args = p.parse_args(argv)
    mb = 1 / 2**20
    sizes = model_sizes(args.model)
    print(f"{args.model}: {sizes['params'] / 1e6:.1f}M parameters; float32 {sizes['f32_bytes'] * mb:.0f} MiB; "
          f"as loaded with NF4 {sizes['quantized_bytes'] * mb:.0f} MiB; largest float32 tensor "
          f"{sizes['largest_f32_tensor_bytes'] * mb:.0f} MiB; GGUF file {sizes['file_bytes'] * mb:.0f} MiB")
    results = {c: run_case(c, args.model) for c in args.cases.split(",")}
    base = results.get("baseline", {}).get("peak_rss_bytes", 0)
    print(f"{'case':<14}{'peak RSS':>12}{'above baseline':>16}{'model arrays':>14}{'time':>8}")
    for case, r in results.items():
        above = r["peak_rss_bytes"] - base
        arrays = r.get("device_bytes")
        print(f"{case:<14}{r['peak_rss_bytes'] * mb:>9.0f} MiB{above * mb:>12.0f} MiB"
              f"{(f'{arrays * mb:.0f} MiB' if arrays else '-'):>14}{r['seconds']:>7.1f}s")
    if "nf4" in results and base:
        budget = sizes["quantized_bytes"] + sizes["largest_f32_tensor_bytes"] + sizes["file_bytes"]
        above = results["nf4"]["peak_rss_bytes"] - base
        print(f"nf4 peak above baseline: {above * mb:.0f} MiB vs quantized + one f32 tensor + mapped file "
              f"{budget * mb:.0f} MiB vs float32 model {sizes['f32_bytes'] * mb:.0f} MiB")
    return {"sizes": sizes, "results": results}


if __name__ == "__main__":
    main()
