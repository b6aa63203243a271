"""Run by test_loading.py in a subprocess with 8 fake CPU devices (XLA_FLAGS must be set before jax
starts): load SmolLM2 (NF4 + LoRA) onto a (data 2, fsdp 2, tensor 2) mesh and report, for every
array, the sharding it was first put with and the one it ended with. Prints one JSON line."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from flax import nnx

from qlora_jax.checkpoints.load import load_model
from qlora_jax.lora import LoraConfig
from qlora_jax.models import loading
from qlora_jax.train import sharding


def main(source: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    mesh = sharding.make_mesh(2, 2, 2)

    def spec_fn(name, shape):
        return sharding.spec_for(mesh, sharding.logical_axes_for(name.replace(".", "/"), shape), shape)

    puts = []  # every device_put the loader makes: (shape, spec or None)
    real_put = jax.device_put

    def recording_put(x, device=None, *args, **kwargs):
        spec = getattr(device, "spec", None)
        puts.append([list(np.shape(x)), None if spec is None else str(spec)])
        return real_put(x, device, *args, **kwargs)

    loading.jax.device_put = recording_put
    try:
        model, _ = load_model(source, quantize="nf4", lora=LoraConfig(r=8), mesh=mesh, shardings=spec_fn,
                              with_tokenizer=False)
    finally:
        loading.jax.device_put = real_put

    leaves = []
    for path, value in jax.tree_util.tree_leaves_with_path(nnx.state(model)):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        name = name.replace("/value/", "/").removesuffix("/value")  # the Variable wrapper's key
        shape = tuple(value.shape)
        expected = spec_fn(name.replace("/", "."), shape)
        leaves.append({"name": name, "shape": list(shape), "spec": str(value.sharding.spec),
                       "expected": str(expected), "devices": len(value.sharding.device_set),
                       "shard_shape": list(value.addressable_shards[0].data.shape),
                       "expected_shard_shape": list(value.sharding.shard_shape(shape))})
    print("RESULT " + json.dumps({"puts": puts, "leaves": leaves}))


if __name__ == "__main__":
    main(sys.argv[1])
