"""Run by tests/test_tpu_compile.py (in .venv-tpu) and tests/test_gpu_compile.py (in .venv-cuda): the
planner's figures (``aot.measure``) for the tiny model's step on 4 chips (v5e 2x2 or 4 H100s) with
``optim.offload``, one JSON line (the planner's row).

    JAX_PLATFORMS=cpu .venv-tpu/bin/python tests/_offload_compile_worker.py 'MESH tpu'
    JAX_PLATFORMS=cpu .venv-cuda/bin/python tests/_offload_compile_worker.py 'MESH gpu'
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _tpu_compile_worker import PER_CHIP, SEQ, TINY  # noqa: E402


def main() -> None:
    from qlora_jax.lora import LoraConfig
    from qlora_jax.models import QuantConfig
    from qlora_jax.train.aot import TARGETS, StepSpec, measure, target_devices

    mesh_arg, kind = " ".join(sys.argv[1:]).split()  # compile_in_venv passes "MESH KIND" as one argument
    mesh = tuple(int(x) for x in mesh_arg.split(","))
    if kind == "gpu":
        target = dataclasses.replace(TARGETS["h100x8"], name="h100x4", topology="1x1x4", chips=4)
    else:
        target = dataclasses.replace(TARGETS["v5e-8"], name="v5e-4", topology="v5e:2x2", chips=4)
    devices = target_devices(target)
    spec = StepSpec(hf_config=TINY, lora=LoraConfig(r=8, alpha=16.0, dropout=0.05), quant=QuantConfig(),
                    dtype="bfloat16", param_dtype="bfloat16", remat="full", micro_batch=PER_CHIP * mesh[0] * mesh[1],
                    grad_accum=1, seq=SEQ, mesh=mesh,
                    optimizer=dict(lr=1e-3, warmup_ratio=0.1, schedule="cosine", weight_decay=0.01,
                                   max_grad_norm=0.3, b1=0.9, b2=0.999, eps=1e-8),
                    frozen_layout="default")
    print(json.dumps(measure(dataclasses.replace(spec, offload=True), target, devices).row()))


if __name__ == "__main__":
    main()
