"""Compiled memory of one QLoRA training step for a full-size model, nothing loaded.

    python bench/memory.py [--config ../shared/model_configs/llama-3.1-8b-instruct.json]
        [--batch 1 --seq 2048 --r 32 --remat full --devices 1 --mesh 1,1,1]

The model is built abstractly (``nnx.eval_shape``: shapes only), the real train step (one jit'd
step, as ``qlora_jax.train``) is lowered and compiled for the mesh, and XLA's
``memory_analysis()`` is printed per device: arguments (NF4 base, adapters, AdamW state, batch),
outputs, temporaries. Set beside the QLoRA paper's storage arithmetic. For a mesh of N fake CPU
devices run with XLA_FLAGS=--xla_force_host_platform_device_count=N.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO.parent / "shared/model_configs/llama-3.1-8b-instruct.json"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--r", type=int, default=32)
    p.add_argument("--remat", default="full", choices=["none", "projections", "full", "dots", "dots_no_batch"])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qlora_jax.lora import LoraConfig
    from qlora_jax.models import CausalLM, ModelConfig, QuantConfig
    from qlora_jax.models.params import count_params
    from qlora_jax.train import loop, sharding
    from qlora_jax.train.footprint import estimate_memory
    from qlora_jax.train.optim import make_optimizer

    config = ModelConfig.from_hf(args.config, remat_policy=args.remat)
    lora = LoraConfig(r=args.r, alpha=1.0, dropout=0.1, init="gaussian")
    data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
    mesh = sharding.make_mesh(data, fsdp, tensor, devices=jax.devices()[: data * fsdp * tensor])
    abstract = nnx.eval_shape(lambda: CausalLM(config, lora=lora, quant=QuantConfig(), dtype=args.dtype,
                                               param_dtype=args.dtype, rngs=nnx.Rngs(0)))
    tx, _ = make_optimizer(lr=2e-3, total_steps=100)
    t0 = time.perf_counter()
    fns, lora_state, rest, opt = loop.make_step_fns(abstract, tx, mesh, abstract=True)
    shape = (1, args.batch, args.seq)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=fns.batch_sharding)
             for k in ("input_ids", "targets", "loss_mask", "segment_ids", "positions")}
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))
    compiled = fns.train_step.lower(lora_state, opt, rest, batch, key).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    counts = count_params(config, lora)
    est = estimate_memory(config, lora, batch=args.batch, seq=args.seq, compute_dtype=args.dtype,
                          param_dtype=args.dtype, remat=args.remat)
    gib = 2**30
    row = {
        "model": Path(args.config).name, "batch": args.batch, "seq": args.seq, "r": args.r, "remat": args.remat,
        "mesh": args.mesh, "compile_s": round(seconds, 1),
        "arguments_gib": mem.argument_size_in_bytes / gib, "outputs_gib": mem.output_size_in_bytes / gib,
        "temporaries_gib": mem.temp_size_in_bytes / gib,
        "args_plus_temps_gib": (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / gib,
        "nf4_base_gib": est.base_4bit / gib, "other_base_gib": est.base_other / gib,
        "trainable": counts.trainable,
    }
    if args.json:
        print(json.dumps(row))
        return
    print(f"{row['model']}: batch {args.batch} x seq {args.seq}, LoRA r={args.r} on all 7 projections, "
          f"remat {args.remat}, {args.dtype}, mesh (data,fsdp,tensor)=({args.mesh}); compiled in {seconds:.0f} s")
    print(f"  per device: arguments {row['arguments_gib']:.2f} GiB + temporaries {row['temporaries_gib']:.2f} GiB "
          f"= {row['args_plus_temps_gib']:.2f} GiB (outputs {row['outputs_gib']:.2f} GiB, aliased with arguments)")
    print(f"  storage arithmetic: NF4+DQ base {row['nf4_base_gib']:.2f} GiB (4.127 bits/param), embeddings/norms "
          f"{row['other_base_gib']:.2f} GiB, adapters {counts.trainable:,} x (4 B + 8 B AdamW) = "
          f"{counts.trainable * 12 / gib:.2f} GiB")


if __name__ == "__main__":
    main()
