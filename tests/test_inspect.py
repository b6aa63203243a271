"""`python -m qlora_jax.inspect` from a config.json alone, against closed-form counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp

from qlora_jax.quant import quantize_4bit
from qlora_jax.train.footprint import quantized_bytes

REPO = Path(__file__).resolve().parents[1]
LLAMA_8B = REPO.parent / "shared/model_configs/llama-3.1-8b-instruct.json"


def test_llama31_8b_counts_from_config_alone():
    cfg = json.loads(LLAMA_8B.read_text())
    out = subprocess.run(
        [sys.executable, "-m", "qlora_jax.inspect", "--config", "configs/sft.py",
         f"--config.model.source={LLAMA_8B}", "--config.lora.r=32", "--config.lora.targets=all-linear"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]  # (out, in)
    trainable = layers * 32 * sum(o + i for o, i in shapes)
    linear = layers * sum(o * i for o, i in shapes)
    other = cfg["vocab_size"] * h * 2 + layers * 2 * h + h
    assert trainable == 83_886_080  # seed 000's figure
    assert f"trainable (LoRA)   {trainable:,}" in out.stdout
    assert f"4-bit-packed count {linear // 2 + other + trainable:,}" in out.stdout
    assert f"= {100 * trainable / (linear // 2 + other + trainable):.2f}%" in out.stdout
    assert "= 1.81%" in out.stdout
    assert f"total params       {linear + other + trainable:,}" in out.stdout
    base = layers * sum(quantized_bytes(o * i) for o, i in shapes)
    assert f"4-bit base storage {base:,} bytes" in out.stdout and "4.127 bits/param" in out.stdout


def test_storage_arithmetic_equals_real_quantized_tensors():
    for shape, dq in [((256, 4096), True), ((1000, 64), True), ((512, 512), False), ((33, 64), True)]:
        q = quantize_4bit(jnp.ones(shape, jnp.bfloat16), double_quant=dq)
        assert quantized_bytes(shape[0] * shape[1], 64, dq) == q.nbytes
