"""qlora_jax's side: ``load_model(..., quantize="nf4")`` + the trainer's own jit'd step.

Uses only public entry points, exactly as ``python -m qlora_jax.train`` wires them:
``checkpoints.load.load_model`` (NF4, blocksize 64, double quantization, LoRA on all seven
projections), ``train.optim.make_optimizer`` (clip to global norm, then AdamW; constant
learning rate here), ``train.loop.make_step_fns`` with its default SFT objective. The batch is
an SFT batch whose loss mask is 1 everywhere except the last position, so the objective is the
mean next-token cross-entropy over all positions (see common.py).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo: qlora_jax without install

import common  # noqa: E402


def main() -> None:
    spec = common.read_spec()
    log = common.log("ours")
    import jax
    import numpy as np

    from qlora_jax.checkpoints.load import load_model
    from qlora_jax.lora import LoraConfig
    from qlora_jax.train import loop
    from qlora_jax.train import sharding as shard_lib
    from qlora_jax.train.optim import make_optimizer

    device = jax.devices()[0]
    dtype = common.jax_dtype_name(spec, device.platform)
    lora = LoraConfig(r=spec["r"], alpha=spec["alpha"], dropout=0.0, targets=common.PROJECTIONS)
    t0 = time.perf_counter()
    model, _ = load_model(spec["model_dir"], quantize="nf4", blocksize=64, double_quant=True, dtype=dtype,
                          param_dtype=dtype, lora=lora, remat=spec.get("ours_remat", "none"),
                          with_tokenizer=False)
    load_s = time.perf_counter() - t0
    rss_after_load = common.rss_mib()
    log(f"loaded in {load_s:.1f} s ({dtype}, remat {spec.get('ours_remat', 'none')}); RSS {rss_after_load:.0f} MiB")

    tx, _ = make_optimizer(lr=spec["lr"], total_steps=spec["warmup"] + spec["steps"], warmup_ratio=0.0,
                           schedule="constant", weight_decay=spec["weight_decay"],
                           max_grad_norm=spec["max_grad_norm"])
    mesh = shard_lib.make_mesh(1, 1, 1, devices=[device])
    fns, lora_state, rest, opt_state = loop.make_step_fns(model, tx, mesh)
    del model
    n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lora_state))

    ids = common.tokens(spec)
    b, s = ids.shape
    loss_mask = np.ones((b, s), np.int32)
    loss_mask[:, -1] = 0
    batch = {
        "input_ids": ids,
        "targets": np.concatenate([ids[:, 1:], np.zeros((b, 1), np.int32)], axis=1),
        "loss_mask": loss_mask,
        "segment_ids": np.ones((b, s), np.int32),
        "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
    }
    batch = jax.device_put({k: v[None] for k, v in batch.items()}, fns.batch_sharding)  # [micro=1, b, s]
    key = jax.device_put(np.asarray(jax.random.key_data(jax.random.key(0))), shard_lib.replicated(mesh))

    t0 = time.perf_counter()
    compiled = fns.train_step.lower(lora_state, opt_state, rest, batch, key).compile()
    compile_s = time.perf_counter() - t0
    memory = common.jax_memory(compiled)
    log(f"compiled in {compile_s:.1f} s; args+temp {memory.get('args_plus_temp_bytes', 0) / 2**20:.0f} MiB")

    state = {"lora": lora_state, "opt": opt_state}

    def step() -> float:
        state["lora"], state["opt"], m = compiled(state["lora"], state["opt"], rest, batch, key)
        return float(m["loss"])

    timing = common.run_steps(step, warmup=spec["warmup"], steps=spec["steps"], log=log)
    common.finish(spec, {
        "side": "ours", "impl": "qlora_jax NF4+DQ (blocksize 64) + LoRA, trainer step",
        "platform": device.platform, "device": device.device_kind, "dtype": dtype,
        "jax": jax.__version__, "remat": spec.get("ours_remat", "none"), "trainable_params": n_trainable, "load_s": load_s,
        "rss_after_load_mib": rss_after_load, "compile_s": compile_s, "memory": memory, **timing,
    })


if __name__ == "__main__":
    main()
