"""QLoRA DPO of the built-in SmolLM2-135M-Instruct on the shipped JSON-record preference set.

    python -m qlora_jax.train --config configs/dpo.py [--config.dpo.beta=0.05 ...]

The same trainer, checkpoints and metrics as SFT (configs/sft.py) with ``objective = "dpo"``. The
reference policy is the NF4 base with the adapters switched off, or, with ``model.init_from`` (e.g.
an SFT run's workdir), those starting adapters frozen. Runs on a 2-core CPU in a few minutes.
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.workdir = "runs/dpo_demo"  # checkpoints, metrics.jsonl, tensorboard/, loss.png, adapters go here
    c.seed = 0  # seeds LoRA init, dropout and data shuffling
    c.objective = "dpo"  # "sft" | "dpo" | "orpo" | "cpo" | "grpo"

    c.dpo = ConfigDict()
    c.dpo.beta = 0.1  # strength of the pull towards the reference (trl default 0.1; seed 001: 0.07-0.13)
    c.dpo.loss_type = "sigmoid"  # "sigmoid" | "robust" | "ipo" | "hinge", as trl 1.16 defines them
    c.dpo.label_smoothing = 0.0  # "robust" only: assumed probability that a preference label is flipped
    c.dpo.reference = "auto"  # "auto": frozen init_from adapters if set, else adapters off | "base" | "init"

    c.model = ConfigDict()
    c.model.source = "smollm2-135m-instruct"  # built-in name, HF model dir, GGUF file, bnb-4bit dir or hub id
    c.model.quantize = "nf4"  # "nf4" | "fp4" | "none": storage of the frozen linears
    c.model.blocksize = 64  # 4-bit quantization block size (QLoRA: 64)
    c.model.double_quant = True  # quantize the absmax constants to 8 bits (QLoRA: on)
    c.model.dtype = "float32"  # compute dtype: float32 on CPU, bfloat16 on GPU/TPU
    c.model.param_dtype = "float32"  # storage of unquantized weights (embeddings, norms)
    c.model.init_from = ""  # a previous run's workdir (e.g. SFT): start from its adapters; they become the reference
    c.model.remat = "projections"  # per decoder layer: "projections" | "none" | "full" | "dots" | "dots_no_batch"
    c.model.attention_impl = "auto"  # "auto" (splash on TPU, cuDNN on GPU, XLA on CPU) | "jax" | "einsum" | "splash" | "cudnn"
    c.model.quant_matmul_impl = "auto"  # 4-bit frozen matmul: "auto" (fused Pallas kernel on TPU, XLA elsewhere) | "xla" | "pallas"

    c.lora = ConfigDict()
    c.lora.r = 16  # adapter rank
    c.lora.alpha = 32.0  # scale s = alpha / r (alpha / sqrt(r) with rslora)
    c.lora.dropout = 0.05  # dropout on the adapter's input (never applied to the reference)
    c.lora.targets = "all-linear"  # "all-linear", comma-separated names (q_proj,v_proj) or a regex
    c.lora.init = "gaussian"  # "gaussian": A ~ N(0, init_std^2), B = 0 | "peft": kaiming-uniform A
    c.lora.init_std = 0.01  # std of A for init="gaussian"
    c.lora.rslora = False  # rank-stabilised scaling alpha / sqrt(r)
    c.lora.use_dora = False  # DoRA: a trained magnitude per output row rescales W + s B A (peft use_dora)

    c.data = ConfigDict()
    c.data.train = "data/dpo_demo/train.jsonl"  # preference rows: prompt/chosen/rejected or chosen/rejected
    c.data.eval = "data/dpo_demo/eval.jsonl"  # held-out pairs for reward accuracy ("" for none)
    c.data.format = "auto"  # preference rows are recognised by their columns ("auto" only)
    c.data.text_as_chat = False  # string prompt/chosen/rejected: render as a user/assistant chat
    c.data.max_length = 128  # tokens per sequence (prompt + completion); longer ones are cut, counted and reported
    c.data.drop_long = False  # drop pairs with an over-long side instead of truncating them
    c.data.pack = False  # not supported for DPO (one sequence per row)
    c.data.group_by_length = True  # batch pairs of similar length together
    c.data.pad_to_multiple_of = 16  # pad each batch to a multiple of this (bounds recompiles)
    c.data.max_eval_examples = 60  # cap on held-out pairs

    c.optim = ConfigDict()
    c.optim.lr = 5e-4  # peak learning rate (LoRA on a tiny set; seed 001's full-size runs used 1e-5)
    c.optim.weight_decay = 0.0  # AdamW decoupled weight decay
    c.optim.max_grad_norm = 1.0  # clip to this global gradient norm (0 disables)
    c.optim.warmup_ratio = 0.1  # fraction of optimizer steps of linear warm-up
    c.optim.schedule = "cosine"  # "cosine" | "linear" | "constant" after warm-up
    c.optim.b1 = 0.9  # Adam beta1
    c.optim.b2 = 0.999  # Adam beta2
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.offload = False  # keep optimizer state in pinned host memory (paged-optimizer analog)

    c.train = ConfigDict()
    c.train.batch_size = 4  # preference pairs per micro-batch (2 rows each: chosen and rejected)
    c.train.grad_accum = 1  # micro-batches per optimizer step
    c.train.epochs = 1.0  # passes over the training pairs (ignored when max_steps > 0)
    c.train.max_steps = 12  # optimizer steps (48 pairs: this preference is learned fast); -1 = derive from epochs
    c.train.log_every = 1  # optimizer steps between metric rows
    c.train.eval_every = 6  # optimizer steps between held-out evaluations (0 = only before and after)
    c.train.early_stopping_patience = 2  # stop after this many evaluations without a better reward accuracy (0 = never)
    c.train.checkpoint_every = 6  # optimizer steps between checkpoints
    c.train.keep_checkpoints = 2  # keep the newest N checkpoints
    c.train.export_peft = True  # write the final adapters (workdir/adapter) and the best (workdir/best_adapter)
    c.train.wandb_project = ""  # also log to this Weights & Biases project ("" = off; pip install 'qlora_jax[wandb]')
    c.train.wandb_mode = "online"  # "online" | "offline" (no network: files in workdir/wandb, upload with `wandb sync`)

    c.mesh = ConfigDict()
    c.mesh.data = -1  # data-parallel axis size (-1 = all remaining devices)
    c.mesh.fsdp = 1  # parameter/optimizer-sharded data-parallel axis size
    c.mesh.tensor = 1  # tensor-parallel axis size
    return c
