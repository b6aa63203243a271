"""Run by tests/test_tpu_compile.py inside .venv-tpu (libtpu installed): compile a tiny model's
training step for a v5e:2x2 topology (4 chips, no hardware) and print one JSON line with the
per-chip memory figures and what the optimized HLO holds.

    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 .venv-tpu/bin/python tests/_tpu_compile_worker.py MESH [auto|default]

``QLORA_ATTENTION_IMPL`` (default "auto") sets ``ModelConfig.attention_impl`` (tests/test_attention_kernels.py).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# Sizes chosen so that no other array has a decoder weight's shape (or a nibble half's, [out, in/2]):
# hidden 384, MLP 640, q 6 x 64, kv 2 x 64, vocab 512; seq 1024 > ATTENTION_BLOCK, so the blockwise
# causal attention is what compiles.
TINY = {
    "model_type": "llama", "vocab_size": 512, "hidden_size": 384, "intermediate_size": 640,
    "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 64,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
SEQ = 1024
PER_CHIP = 1


def non_fused_shapes(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape, opcode) of every instruction outside fused computations: the buffers XLA allocates."""
    fused = set(re.findall(r"\bcalls=%([\w.\-]+)", hlo))
    out = []
    current = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$", line)
        if head:
            current = head.group(1)
            continue
        if current is None or current in fused:
            continue
        m = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = (\w+)\[([\d,]*)\]\S* (\w[\w\-]*)\(", line)
        if m:
            dims = tuple(int(d) for d in m.group(2).split(",") if d)
            out.append((m.group(1), dims, m.group(3)))
    return out


def attention_score_buffers(shapes: list, heads: int, kv_heads: int) -> list[str]:
    """Float buffers shaped like attention scores or probabilities: ``[..., t, s]`` with both of
    ``t, s`` at least ``SEQ // 2`` (the blockwise path's 512-row blocks included) and leading dims
    holding the heads (``[b, heads]`` or ``[b, kv_heads, group]``); the logits [rows, SEQ, vocab]
    have no heads in front."""
    out = set()
    for t, s, op in shapes:
        if t in ("f32", "bf16", "f16") and len(s) >= 3 and min(s[-2:]) >= SEQ // 2 and max(s[-2:]) <= SEQ:
            lead = 1
            for x in s[:-2]:
                lead *= x
            if lead % kv_heads == 0 and lead >= min(heads, kv_heads * 2):
                out.add(f"{t}{list(s)} {op}")
    return sorted(out)


def main() -> None:
    mesh_arg = sys.argv[1] if len(sys.argv) > 1 else "4,1,1"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import dataclasses

    from qlora_jax.lora import LoraConfig
    from qlora_jax.models import ModelConfig, QuantConfig
    from qlora_jax.train.aot import TARGETS, StepSpec, compile_step, target_devices

    target = dataclasses.replace(TARGETS["v5e-8"], name="v5e-4", topology="v5e:2x2", chips=4)
    devices = target_devices(target)
    mesh = tuple(int(x) for x in mesh_arg.split(","))
    layout = sys.argv[2] if len(sys.argv) > 2 else "auto"  # "auto": as the trainer compiles it on TPU
    spec = StepSpec(hf_config=TINY, lora=LoraConfig(r=8, alpha=16.0, dropout=0.05), quant=QuantConfig(),
                    dtype="bfloat16", param_dtype="bfloat16", remat="full", micro_batch=PER_CHIP * mesh[0] * mesh[1],
                    grad_accum=1, seq=SEQ, mesh=mesh,
                    optimizer=dict(lr=1e-3, warmup_ratio=0.1, schedule="cosine", weight_decay=0.01,
                                   max_grad_norm=0.3, b1=0.9, b2=0.999, eps=1e-8),
                    frozen_layout=layout, attention_impl=os.environ.get("QLORA_ATTENTION_IMPL", "auto"))
    t0 = time.perf_counter()
    compiled = compile_step(spec, devices)
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    config = ModelConfig.from_hf(TINY)
    weights, halves = set(), set()
    for out_f, in_f in config.linear_shapes().values():
        weights |= {(out_f, in_f), (in_f, out_f)}
        halves |= {(out_f, in_f // 2), (in_f // 2, out_f)}
    float_types = {"f32", "bf16", "f16"}
    shapes = non_fused_shapes(hlo)
    weight_buffers = sorted({f"{t}{list(s)}" for t, s, _ in shapes
                             if t in float_types and len(s) >= 2 and tuple(s[-2:]) in weights})
    # The decoded nibble halves [out, in/2] in the compute dtype: fused into the matmuls at 8B size;
    # XLA may still materialize small ones in the backward pass (reported, not asserted).
    half_buffers = sorted({f"{t}{list(s)}" for t, s, _ in shapes
                           if t in ("bf16", "f16") and len(s) >= 2 and tuple(s[-2:]) in halves})
    # A relayout copy of a frozen uint8 array (NF4 codes, 8-bit absmax) would be a second copy of
    # the 4-bit base per step: the frozen state is compiled in the layouts XLA picks, so none.
    u8_copies = sorted({f"{t}{list(s)}" for t, s, op in shapes if t == "u8" and op == "copy"})
    score_buffers = sorted({f"{t}{list(s)}" for t, s, _ in shapes
                            if t in float_types and len(s) >= 3 and s[-1] == SEQ and s[-2] == SEQ})
    print(json.dumps({
        "mesh": mesh_arg, "compile_s": round(seconds, 1), "arguments": mem.argument_size_in_bytes,
        "temporaries": mem.temp_size_in_bytes, "outputs": mem.output_size_in_bytes,
        "weight_buffers": weight_buffers, "half_buffers": half_buffers, "score_buffers": score_buffers,
        "u8_copies": u8_copies, "frozen_layout": spec.frozen_layout, "n_instructions": len(shapes),
        "attention_impl": spec.attention_impl, "tpu_custom_calls": hlo.count('custom_call_target="tpu_custom_call"'),
        "splash_calls": len(re.findall(r"%splash_mha_[\w.]+ = .* custom-call\(", hlo)),
        "attention_scores": attention_score_buffers(shapes, TINY["num_attention_heads"], TINY["num_key_value_heads"]),
        "seq": SEQ, "per_chip": PER_CHIP, "platform": devices[0].platform,
    }))


if __name__ == "__main__":
    main()
