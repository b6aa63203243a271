"""Seed 003's target: Qwen2.5-3B-Instruct (needs the weights on disk or a network).

    python -m qlora_jax.train --config configs/qwen25_3b_instruct.py --config.model.source=/path/to/Qwen2.5-3B-Instruct
"""

from configs.sft import get_config as _base


def get_config():
    c = _base()
    c.workdir = "runs/qwen25_3b_instruct"
    c.model.source = "Qwen/Qwen2.5-3B-Instruct"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.remat = "full"
    c.lora.r = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.05
    c.lora.init = "peft"
    c.data.max_length = 1024
    c.optim.lr = 2e-4
    c.optim.warmup_ratio = 0.03
    c.train.batch_size = 4
    c.train.grad_accum = 8
    c.train.epochs = 1.0
    return c
