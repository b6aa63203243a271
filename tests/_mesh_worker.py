"""Run by test_sharding.py in a subprocess with 8 fake CPU devices (XLA_FLAGS must be set before
jax starts). Prints one JSON line: per-mesh losses and final adapters' checksums."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np

from qlora_jax import data as data_lib
from qlora_jax.checkpoints.load import load_model
from qlora_jax.lora import LoraConfig
from qlora_jax.train import loop, sharding
from qlora_jax.train.optim import make_optimizer

REPO = Path(__file__).resolve().parents[1]


def main(model_dir: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    lora = LoraConfig(r=4, alpha=8, dropout=0.1, init="gaussian", init_std=0.05)
    batches = None
    results = {}
    for name, mesh_shape, devices, offload in [
        ("single", (1, 1, 1), jax.devices()[:1], False),
        ("2x2x2", (2, 2, 2), None, False),
        ("8x1x1", (8, 1, 1), None, False),
        ("1x1x8", (1, 1, 8), None, False),
        ("single_offload", (1, 1, 1), jax.devices()[:1], True),
    ]:
        mesh = sharding.make_mesh(*mesh_shape, devices=devices)
        model, tok = load_model(model_dir, quantize="nf4", lora=lora, mesh=mesh,
                                shardings=lambda n, s, m=mesh: sharding.spec_for(
                                    m, sharding.logical_axes_for(n.replace(".", "/"), s), s))
        if batches is None:
            examples, _ = data_lib.prepare_sft(REPO / "data/sft_demo/train.jsonl", tok, max_length=128)
            it = data_lib.BatchIterator(examples, batch_size=8, seq_len=128, seed=0, pad_id=0)
            batches = [loop.stack_microbatches([next(it), next(it)], 0) for _ in range(3)]
        tx, _ = make_optimizer(lr=5e-3, total_steps=3, warmup_ratio=0.0)
        fns, lora_state, rest, opt = loop.make_step_fns(model, tx, mesh, offload_optimizer=offload)
        kinds = sorted({getattr(x.sharding, "memory_kind", None) or "device" for x in jax.tree.leaves(opt)})
        sharded = sum(1 for x in jax.tree.leaves(rest) if not x.sharding.is_fully_replicated)
        losses = []
        for step, b in enumerate(batches):
            key = jax.random.key_data(jax.random.fold_in(jax.random.key(0), step))
            lora_state, opt, m = fns.train_step(lora_state, opt, rest, b, key)
            losses.append(float(m["loss"]))
        results[name] = {"losses": losses, "opt_memory_kinds": kinds, "sharded_frozen_leaves": sharded,
                         "lora_sum": float(sum(np.abs(np.asarray(x)).sum() for x in jax.tree.leaves(lora_state)))}
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
