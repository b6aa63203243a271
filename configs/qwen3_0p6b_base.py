"""Seed 001's SFT target: Qwen3-0.6B-Base (needs the weights on disk or a network).

    python -m qlora_jax.train --config configs/qwen3_0p6b_base.py --config.model.source=/path/to/Qwen3-0.6B-Base
"""

from configs.sft import get_config as _base


def get_config():
    c = _base()
    c.workdir = "runs/qwen3_0p6b_base"
    c.model.source = "Qwen/Qwen3-0.6B-Base"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.lora.r = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.05
    c.lora.init = "peft"
    c.data.max_length = 1024
    c.optim.lr = 2e-4  # QLoRA paper's default for small models
    c.optim.warmup_ratio = 0.03
    c.train.batch_size = 8
    c.train.grad_accum = 4
    c.train.epochs = 1.0
    return c
