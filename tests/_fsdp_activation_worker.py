"""Run by tests/test_sharding.py with 4 fake CPU devices: compile the tiny model's bf16 training
step on an FSDP mesh (1, 4, 1), one sequence per device, and print one JSON line: temporaries and
the non-fused float buffers that hold the global batch's activations ([4, seq, features]).

    python tests/_fsdp_activation_worker.py [--no-constraint]

``--no-constraint`` replaces ``models.layers.shard_activation`` by the identity: the step as it
was before activations were pinned to the batch sharding (the reference the test compares with).
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    if "--no-constraint" in sys.argv:
        from qlora_jax.models import layers

        layers.shard_activation = lambda x, feature_axis=None: x
    import jax
    from _tpu_compile_worker import SEQ, TINY, non_fused_shapes

    from qlora_jax.lora import LoraConfig
    from qlora_jax.models import QuantConfig
    from qlora_jax.train.aot import StepSpec, compile_step

    rows, rank = 4, 8
    spec = StepSpec(hf_config=TINY, lora=LoraConfig(r=rank, alpha=16.0, dropout=0.05), quant=QuantConfig(),
                    dtype="bfloat16", param_dtype="bfloat16", remat="full", micro_batch=rows, grad_accum=1,
                    seq=SEQ, mesh=(1, rows, 1),
                    optimizer=dict(lr=1e-3, warmup_ratio=0.1, schedule="cosine", weight_decay=0.01,
                                   max_grad_norm=0.3, b1=0.9, b2=0.999, eps=1e-8))
    compiled = compile_step(spec, jax.devices("cpu"))
    # [rows, seq, features] on one device = every device's sequences; features > rank leaves out the
    # LoRA [tokens, r] intermediates.
    gathered = [f"{t}{list(s)} {op}" for t, s, op in non_fused_shapes(compiled.as_text())
                if t in ("f32", "bf16") and len(s) >= 3 and s[:2] == (rows, SEQ) and s[-1] > rank]
    print(json.dumps({"temporaries": compiled.memory_analysis().temp_size_in_bytes, "gathered": gathered}))


if __name__ == "__main__":
    main()
