"""Seed 000's Stage-1 settings on LLaMA-3.1-8B-Instruct (needs the weights: an HF directory, a
bnb-4bit checkpoint, a GGUF file, or the hub id with a network and access).

    python -m qlora_jax.train --config configs/llama31_8b_seed000.py \
        --config.model.source=/path/to/Meta-Llama-3.1-8B-Instruct --config.data.train=my.jsonl
"""

from configs.sft import get_config as _base


def get_config():
    c = _base()
    c.workdir = "runs/llama31_8b_seed000"
    c.model.source = "meta-llama/Llama-3.1-8B-Instruct"  # or a local directory / .gguf
    c.model.dtype = "bfloat16"  # "half precision" compute on accelerators
    c.model.param_dtype = "bfloat16"
    c.model.remat = "full"
    c.lora.r = 32  # seed 000: r=32, alpha=1, dropout 0.1, Q/K/V/O + MLP
    c.lora.alpha = 1.0
    c.lora.dropout = 0.1
    c.lora.targets = "all-linear"
    c.lora.init = "gaussian"  # A ~ N(0, 0.01^2), B = 0
    c.lora.init_std = 0.01
    c.data.train = "data/sft_demo/train.jsonl"  # replace with your data
    c.data.eval = "data/sft_demo/eval.jsonl"
    c.data.max_length = 2048
    c.train.batch_size = 1  # x 16 accumulation, as the seed
    c.train.grad_accum = 16
    c.train.epochs = 2.0  # Stage 1: 2 epochs (Stage 2: 4)
    c.train.checkpoint_every = 50
    c.optim.offload = False  # True keeps AdamW state in pinned host memory (paged-optimizer analog)
    return c
