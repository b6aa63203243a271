"""Run by tests/test_gpu_compile.py inside .venv-cuda (the jax CUDA plugin installed): compile the tiny
model's training step for 4 NVIDIA H100s (a compile-only CUDA topology from
qlora_jax/train/gpu_specs/h100_sxm.txtpb: no GPU, driver or CUDA library) and print one JSON line with
the per-GPU memory figures and what the optimized HLO holds.

    JAX_PLATFORMS=cpu .venv-cuda/bin/python tests/_gpu_compile_worker.py MESH

``QLORA_ATTENTION_IMPL`` (default "auto") sets ``ModelConfig.attention_impl``; "cudnn" needs the cuDNN
library (the nvidia-cudnn-cu12 wheel) importable, else the worker prints ``{"skip": ...}``.
``QLORA_COMPILE_MODEL=qwen3_moe`` compiles ``TINY_MOE`` instead (``moe_main``).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _tpu_compile_worker import PER_CHIP, SEQ, TINY, attention_score_buffers, non_fused_shapes  # noqa: E402

GPUS = 4


def main() -> None:
    mesh_arg = sys.argv[1] if len(sys.argv) > 1 else f"{GPUS},1,1"
    import dataclasses

    from qlora_jax.lora import LoraConfig
    from qlora_jax.models import ModelConfig, QuantConfig
    from qlora_jax.models.layers import _cudnn_found
    from qlora_jax.train.aot import TARGETS, StepSpec, compile_step, target_devices

    impl = os.environ.get("QLORA_ATTENTION_IMPL", "auto")
    target = dataclasses.replace(TARGETS["h100x8"], name=f"h100x{GPUS}", topology=f"1x1x{GPUS}", chips=GPUS)
    devices = target_devices(target)
    if impl == "cudnn":
        try:
            from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version

            check_cudnn_version()
        except Exception as e:  # noqa: BLE001 - RuntimeError("cuDNN not found.")
            print(json.dumps({"skip": f"cuDNN library not found by jax ({e}): pip install nvidia-cudnn-cu12"}))
            return
    mesh = tuple(int(x) for x in mesh_arg.split(","))
    spec = StepSpec(hf_config=TINY, lora=LoraConfig(r=8, alpha=16.0, dropout=0.05), quant=QuantConfig(),
                    dtype="bfloat16", param_dtype="bfloat16", remat="full", micro_batch=PER_CHIP * mesh[0] * mesh[1],
                    grad_accum=1, seq=SEQ, mesh=mesh,
                    optimizer=dict(lr=1e-3, warmup_ratio=0.1, schedule="cosine", weight_decay=0.01,
                                   max_grad_norm=0.3, b1=0.9, b2=0.999, eps=1e-8),
                    frozen_layout="default", attention_impl=impl)  # as the trainer compiles it off TPU
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
    # A decoded weight is [out, in] (or [in, out]), or a scanned stack of them [layers, out, in].
    # Other arrays can end in the same two sizes: XLA:GPU keeps bitcasts (views, no allocation) of
    # the lm_head [vocab, hidden] as [4, 128, 384] (the chunked logits) and of the [seq, hidden]
    # activations as [8, 128, 384] (a split-K matmul for the LoRA A gradient: 8 chunks of 128
    # tokens); those are listed in weight_shaped, not asserted on.
    layers = TINY["num_hidden_layers"]
    weight_shaped = sorted({f"{t}{list(s)} {op}" for t, s, op in shapes
                            if t in float_types and len(s) >= 2 and tuple(s[-2:]) in weights})
    weight_buffers = sorted({f"{t}{list(s)} {op}" for t, s, op in shapes
                             if t in float_types and len(s) >= 2 and tuple(s[-2:]) in weights
                             and tuple(s[:-2]) in ((), (layers,))})
    half_buffers = sorted({f"{t}{list(s)} {op}" for t, s, op in shapes
                           if t in ("bf16", "f16") and len(s) >= 2 and tuple(s[-2:]) in halves})
    # Fusions whose whole output is a constant broadcast to a decoded weight half [out, in/2] in
    # float32: the NF4 code values of quant.nf4.code_values, hoisted out of the layer loop as 16
    # full-size arrays per shape (at 8B: ~3.8 GiB of the (8,1,1) step's 5.3 GiB of temporaries).
    level_broadcasts = sorted(
        f"{t}[{d}]" for t, d in re.findall(r"ROOT %[\w.\-]+ = (f32)\[([\d,]+)\]\S* broadcast\(%constant", hlo)
        if tuple(int(x) for x in d.split(","))[-2:] in halves)
    score_buffers = sorted({f"{t}{list(s)} {op}" for t, s, op in shapes
                            if t in float_types and len(s) >= 3 and s[-1] == SEQ and s[-2] == SEQ})
    print(json.dumps({
        "mesh": mesh_arg, "compile_s": round(seconds, 1), "arguments": mem.argument_size_in_bytes,
        "temporaries": mem.temp_size_in_bytes, "outputs": mem.output_size_in_bytes,
        "aliased": mem.alias_size_in_bytes,
        "weight_buffers": weight_buffers, "weight_shaped": weight_shaped, "half_buffers": half_buffers,
        "score_buffers": score_buffers, "level_broadcasts": level_broadcasts,
        "n_instructions": len(shapes), "seq": SEQ, "per_chip": PER_CHIP, "gpus": GPUS,
        "attention_impl": impl, "cudnn_found": _cudnn_found(), "cudnn_calls": len(re.findall(r'custom_call_target="__cudnn\$fmha', hlo)),
        "attention_scores": attention_score_buffers(shapes, TINY["num_attention_heads"], TINY["num_key_value_heads"]),
        # [b, 1, t, s]: the same-segment mask cuDNN takes as a bias (one per row, not per head)
        "mask_buffers": sorted({f"{t}{list(s)} {op}" for t, s, op in shapes
                                if len(s) == 4 and s[1] == 1 and s[-1] == SEQ and s[-2] == SEQ}),
        "platform": devices[0].platform, "device_kind": devices[0].device_kind,
    }))
    if os.environ.get("QLORA_GPU_HLO_DUMP"):
        with open(os.environ["QLORA_GPU_HLO_DUMP"], "w") as f:
            f.write(hlo)


# A tiny Qwen3-MoE whose MOE_PER_CHIP x 1024 tokens x top-8 = 32,768 expert assignments per batch
# shard are sorted in one argsort (each shard sorts its own, moe.SparseMoeBlock): large enough for
# XLA:GPU to pick its CUB radix sort, which a compile-only target cannot size (the planner turns it
# off, train/aot.py: GPU_COMPILER_OPTIONS). Every other size is small.
MOE_PER_CHIP = 4
TINY_MOE = {
    "model_type": "qwen3_moe", "vocab_size": 256, "hidden_size": 128, "moe_intermediate_size": 64,
    "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 32, "num_experts": 16, "num_experts_per_tok": 8, "norm_topk_prob": True,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
}
MOE_EXPERT_PARAMS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def moe_main(mesh_arg: str) -> None:
    import dataclasses

    from qlora_jax.lora import LoraConfig
    from qlora_jax.models import QuantConfig
    from qlora_jax.train.aot import TARGETS, StepSpec, compile_step, target_devices

    target = dataclasses.replace(TARGETS["h100x8"], name=f"h100x{GPUS}", topology=f"1x1x{GPUS}", chips=GPUS)
    devices = target_devices(target)
    mesh = tuple(int(x) for x in mesh_arg.split(","))
    spec = StepSpec(hf_config=TINY_MOE, lora=LoraConfig(r=8, alpha=16.0, dropout=0.0, target_parameters=MOE_EXPERT_PARAMS),
                    quant=QuantConfig(), dtype="bfloat16", param_dtype="bfloat16", remat="full",
                    micro_batch=MOE_PER_CHIP * mesh[0] * mesh[1], grad_accum=1, seq=SEQ, mesh=mesh,
                    optimizer=dict(lr=1e-3, warmup_ratio=0.1, schedule="cosine", weight_decay=0.01,
                                   max_grad_norm=0.3, b1=0.9, b2=0.999, eps=1e-8), frozen_layout="default")
    t0 = time.perf_counter()
    compiled = compile_step(spec, devices)
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    print(json.dumps({
        "mesh": mesh_arg, "compile_s": round(seconds, 1), "arguments": mem.argument_size_in_bytes,
        "temporaries": mem.temp_size_in_bytes, "platform": devices[0].platform, "gpus": GPUS,
        # the sorts over a 1-D s32 array (the expert ids of every assignment), and CUB's custom calls
        "sorts_1d": sorted({int(n) for n in re.findall(r"= \(s32\[(\d+)\]\S*, s32\[\d+\]\S*.*\) sort\(", hlo)}),
        "cub_calls": len(re.findall(r'custom_call_target="__cub\$', hlo)),
    }))


if __name__ == "__main__":
    if os.environ.get("QLORA_COMPILE_MODEL") == "qwen3_moe":
        moe_main(sys.argv[1] if len(sys.argv) > 1 else f"{GPUS},1,1")
    else:
        main()
