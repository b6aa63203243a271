"""Quantize / dequantize throughput: qlora_jax vs bitsandbytes, NF4 with double quantization.

    python bench/quant.py                      # a 4096 x 14336 bf16 weight (LLaMA-3-8B's MLP)
    python bench/quant.py --size 1024x4096 --repeats 3
    python bench/quant.py --no-bnb             # qlora_jax only (no torch / bitsandbytes needed)

Both run on the same weight in one process, on whatever device each uses by default (for
qlora_jax the first JAX device, for bitsandbytes the CPU unless --torch-device says otherwise).
qlora_jax is timed as a jitted function with ``block_until_ready``; the first call (compilation,
warm-up) is excluded and the median of ``--repeats`` calls is reported. Throughput is in
elements per second and in GB/s of the bf16 tensor (quantize reads it, dequantize writes it).
A benchmark, not a test: it prints numbers and checks only that both sides decode alike.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.quant import dequantize_4bit, quantize_4bit


def _median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[object], object]) -> float:
    sync(fn())  # warm-up: compilation and first-touch allocation, not timed
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _report(label: str, n: int, seconds: float) -> None:
    print(f"  {label:<28s} {seconds * 1e3:9.1f} ms  {n / seconds / 1e6:9.1f} Melem/s  "
          f"{2 * n / seconds / 1e9:7.3f} GB/s (bf16)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="4096x14336", help="weight shape ROWSxCOLS (default 4096x14336)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median)")
    parser.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--no-double-quant", action="store_true")
    parser.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes")
    parser.add_argument("--torch-device", default="cpu", help="device for bitsandbytes (cpu, cuda, ...)")
    args = parser.parse_args()

    rows, cols = (int(d) for d in args.size.lower().split("x"))
    n = rows * cols
    double_quant = not args.no_double_quant
    print(f"weight {rows}x{cols} bfloat16 ({n / 1e6:.1f} M elements, {2 * n / 1e9:.3f} GB), "
          f"{args.quant_type}, blocksize {args.blocksize}, double quant {double_quant}, "
          f"median of {args.repeats}")

    weight = jax.random.normal(jax.random.key(0), (rows, cols), jnp.float32).astype(jnp.bfloat16)
    quantize = jax.jit(lambda w: quantize_4bit(w, quant_type=args.quant_type, blocksize=args.blocksize,
                                               double_quant=double_quant))
    dequantize = jax.jit(lambda q: dequantize_4bit(q, jnp.bfloat16))

    print(f"qlora_jax on {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    q = quantize(weight)
    t_q = _median_seconds(lambda: quantize(weight), args.repeats, jax.block_until_ready)
    _report("quantize_4bit", n, t_q)
    ours = dequantize(q)
    t_d = _median_seconds(lambda: dequantize(q), args.repeats, jax.block_until_ready)
    _report("dequantize_4bit", n, t_d)

    if args.no_bnb:
        return
    import bitsandbytes
    import bitsandbytes.functional as F
    import torch

    device = torch.device(args.torch_device)
    sync = (lambda x: torch.cuda.synchronize()) if device.type == "cuda" else (lambda x: x)
    w_torch = torch.from_numpy(np.array(weight.astype(jnp.float32))).to(torch.bfloat16).to(device)
    print(f"bitsandbytes {bitsandbytes.__version__} on {device} (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")

    def bnb_quantize():
        return F.quantize_4bit(w_torch, blocksize=args.blocksize, compress_statistics=double_quant,
                               quant_type=args.quant_type)

    packed, state = bnb_quantize()
    t_bq = _median_seconds(bnb_quantize, args.repeats, sync)
    _report("F.quantize_4bit", n, t_bq)
    t_bd = _median_seconds(lambda: F.dequantize_4bit(packed, state), args.repeats, sync)
    _report("F.dequantize_4bit", n, t_bd)

    print(f"speed ratio qlora_jax / bitsandbytes: quantize {t_bq / t_q:.2f}x, dequantize {t_bd / t_d:.2f}x "
          "(>1: qlora_jax faster)")

    # Sanity: both decode the same weight alike (bnb-CPU's N-D dequantize is unreliable: use 1-D).
    flat_state = copy.copy(state)
    flat_state.shape = torch.Size([n])
    theirs = F.dequantize_4bit(packed, flat_state).reshape(rows, cols).float().cpu().numpy()
    diff = np.abs(np.asarray(ours.astype(jnp.float32)) - theirs)
    same_codes = np.mean(np.asarray(q.packed).reshape(-1) == packed.cpu().numpy().reshape(-1))
    same_absmax = np.mean(np.asarray(q.absmax).reshape(-1) == state.absmax.cpu().numpy().reshape(-1))
    print(f"check: identical packed 4-bit bytes {same_codes:.4%}, identical absmax codes {same_absmax:.4%} "
          f"(bnb-CPU's 8-bit encoder is approximate), max |ours - bnb| after dequantize {diff.max():.3g}")


if __name__ == "__main__":
    main()
