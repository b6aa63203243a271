"""QLoRA SFT of the built-in SmolLM2-135M-Instruct on the shipped unit-conversion task.

    python -m qlora_jax.train --config configs/sft.py [--config.optim.lr=1e-3 ...]

Runs on a 2-core CPU in minutes. Optimizer defaults are seed 000's (AdamW 2e-3, wd 0.01,
clip 0.3, warm-up 0.3, cosine); batch and epochs are sized for the demo.
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.workdir = "runs/sft_demo"  # checkpoints, metrics.jsonl, tensorboard/, loss.png, adapters go here
    c.seed = 0  # seeds LoRA init, dropout and data shuffling
    c.objective = "sft"  # "sft": NLL of the completion tokens | "dpo": preference pairs (see configs/dpo.py)

    c.model = ConfigDict()
    c.model.source = "smollm2-135m-instruct"  # built-in name, HF model dir, GGUF file, bnb-4bit dir or hub id
    c.model.quantize = "nf4"  # "nf4" | "fp4" | "none": storage of the frozen linears
    c.model.blocksize = 64  # 4-bit quantization block size (QLoRA: 64)
    c.model.double_quant = True  # quantize the absmax constants to 8 bits (QLoRA: on)
    c.model.dtype = "float32"  # compute dtype: float32 on CPU, bfloat16 on GPU/TPU
    c.model.param_dtype = "float32"  # storage of unquantized weights (embeddings, norms)
    c.model.init_from = ""  # a previous run's workdir: start from its newest adapters (stage handoff)
    # per decoder layer: "projections" (keep projection outputs, recompute norms, attention
    # probabilities, SiLU) | "none" | "full" (recompute everything) | "dots" | "dots_no_batch"
    c.model.remat = "projections"
    c.model.attention_impl = "auto"  # "auto" (splash on TPU, cuDNN on GPU, XLA on CPU) | "jax" | "einsum" | "splash" | "cudnn"
    c.model.quant_matmul_impl = "auto"  # 4-bit frozen matmul: "auto" (fused Pallas kernel on TPU, XLA elsewhere) | "xla" | "pallas"

    c.lora = ConfigDict()
    c.lora.r = 16  # adapter rank
    c.lora.alpha = 32.0  # scale s = alpha / r (alpha / sqrt(r) with rslora)
    c.lora.dropout = 0.05  # dropout on the adapter's input
    c.lora.targets = "all-linear"  # "all-linear", comma-separated names (q_proj,v_proj) or a regex
    # MoE expert tensors to adapt, comma-separated (peft's target_parameters; qwen3_moe:
    # "mlp.experts.gate_up_proj,mlp.experts.down_proj"); needs lora.dropout=0
    c.lora.target_parameters = ""
    c.lora.init = "gaussian"  # "gaussian": A ~ N(0, init_std^2) (seed 000) | "peft": kaiming-uniform A | "pissa" | "pissa_niter_K" | "loftq"
    c.lora.loftq_iter = 1  # alternating quantize / SVD rounds for init="loftq"
    c.lora.init_std = 0.01  # std of A for init="gaussian"
    c.lora.rslora = False  # rank-stabilised scaling alpha / sqrt(r)
    c.lora.use_dora = False  # DoRA: a trained magnitude per output row rescales W + s B A (peft use_dora)

    c.data = ConfigDict()
    c.data.train = "data/sft_demo/train.jsonl"  # JSON/JSONL/CSV/parquet file, or a hub dataset name
    c.data.eval = "data/sft_demo/eval.jsonl"  # held-out file ("" for none)
    c.data.format = "auto"  # "auto" | "alpaca" | "chat" | "prompt_completion"
    c.data.max_length = 128  # tokens per example; longer ones are truncated (counted and reported)
    c.data.drop_long = False  # drop over-long examples instead of truncating them
    c.data.train_on_prompt = False  # also put loss on prompt tokens
    c.data.pack = False  # pack several examples per row (attention stays within each example)
    c.data.group_by_length = True  # batch examples of similar length together
    c.data.pad_to_multiple_of = 32  # without packing, pad each batch to a multiple of this (bounds recompiles)
    c.data.max_eval_examples = 64  # cap on held-out examples for eval loss and generation

    c.optim = ConfigDict()
    c.optim.lr = 2e-3  # peak learning rate (seed 000)
    c.optim.weight_decay = 0.01  # AdamW decoupled weight decay
    c.optim.max_grad_norm = 0.3  # clip to this global gradient norm (0 disables)
    c.optim.warmup_ratio = 0.3  # fraction of optimizer steps of linear warm-up
    c.optim.schedule = "cosine"  # "cosine" | "linear" | "constant" after warm-up
    c.optim.b1 = 0.9  # Adam beta1
    c.optim.b2 = 0.999  # Adam beta2
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.loraplus_lr_ratio = 0.0  # LoRA+: lora_b's learning rate = lr x this (0 = off; the paper uses 16)
    c.optim.offload = False  # keep optimizer state in pinned host memory (paged-optimizer analog)

    c.train = ConfigDict()
    c.train.batch_size = 8  # examples per micro-batch (global, across devices)
    c.train.grad_accum = 1  # micro-batches per optimizer step (seed 000: 16)
    c.train.epochs = 0.5  # passes over the training set (ignored when max_steps > 0)
    c.train.max_steps = -1  # optimizer steps; -1 = derive from epochs
    c.train.log_every = 1  # optimizer steps between metric rows
    c.train.eval_every = 0  # optimizer steps between eval-loss passes (0 = only before and after)
    c.train.checkpoint_every = 10  # optimizer steps between checkpoints
    c.train.keep_checkpoints = 2  # keep the newest N checkpoints
    c.train.generate_eval = 24  # held-out prompts to answer greedily before and after (0 = skip)
    c.train.max_new_tokens = 24  # generation length for that check
    c.train.export_peft = True  # write adapters in PEFT format at the end (workdir/adapter)
    c.train.wandb_project = ""  # also log to this Weights & Biases project ("" = off; pip install 'qlora_jax[wandb]')
    c.train.wandb_mode = "online"  # "online" | "offline" (no network: files in workdir/wandb, upload with `wandb sync`)

    c.mesh = ConfigDict()
    c.mesh.data = -1  # data-parallel axis size (-1 = all remaining devices)
    c.mesh.fsdp = 1  # parameter/optimizer-sharded data-parallel axis size
    c.mesh.tensor = 1  # tensor-parallel axis size
    return c
