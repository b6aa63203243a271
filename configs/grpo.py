"""QLoRA GRPO of the built-in SmolLM2-135M-Instruct on the shipped "reasoning ##### answer" task.

    python -m qlora_jax.train --config configs/grpo.py [--config.grpo.beta=0.0 --config.grpo.loss_type=grpo ...]

Each optimizer step samples ``num_generations`` completions for each of its prompts from the current
policy (the jit-compiled KV-cache sampler), scores them with the reward functions, normalizes the
rewards within each prompt's group, and takes a clipped policy-gradient step with a k3 KL penalty to
the reference (the NF4 base with the adapters switched off). Same checkpoints, resume, metrics and
PEFT export as SFT (configs/sft.py). The demo runs on a 2-core CPU in about a quarter of an hour.
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.workdir = "runs/grpo_demo"  # checkpoints, metrics.jsonl, tensorboard/, loss.png, reward.png, adapter
    c.seed = 0  # seeds LoRA init, prompt order and the sampler's draws
    c.objective = "grpo"  # "sft" | "dpo" | "grpo"

    c.grpo = ConfigDict()
    c.grpo.num_generations = 8  # G: completions sampled per prompt (>= 2: the group mean is the baseline)
    c.grpo.reward_funcs = "format,exact_match"  # comma-separated: built-ins format, exact_match, or pkg.module:function
    c.grpo.reward_weights = ""  # comma-separated weights, one per reward function ("" = all 1.0); rewards are summed
    c.grpo.scale_rewards = "group"  # divide advantages by the std of the "group" | the "batch" | "none" (Dr. GRPO)
    c.grpo.loss_type = "dapo"  # "grpo" | "bnpo" | "dr_grpo" | "dapo" token normalization, as trl 1.16 (see grpo.py)
    c.grpo.beta = 0.04  # weight of the k3 KL penalty to the reference (trl default 0.0; DeepSeekMath 0.04)
    c.grpo.epsilon = 0.2  # clip the probability ratio below at 1 - epsilon
    c.grpo.epsilon_high = 0.28  # and above at 1 + epsilon_high (DAPO's clip-higher; -1 = same as epsilon)
    c.grpo.num_iterations = 1  # mu: optimizer steps on each generated batch (> 1 computes the old log-probs)
    c.grpo.max_prompt_length = 128  # longer prompts lose their start (trl's left truncation), counted
    c.grpo.max_completion_length = 32  # tokens sampled per completion (also dr_grpo's constant)
    c.grpo.temperature = 0.8  # sampling temperature; log-probs are of the tempered policy, as trl
    c.grpo.top_k = 0  # sample from the k most likely tokens (0 = off)
    c.grpo.top_p = 1.0  # nucleus sampling threshold (1 = off)
    c.grpo.mask_truncated_completions = False  # completions without a stop token get no loss (DAPO)
    c.grpo.reference = "auto"  # "auto": frozen init_from adapters if set, else adapters off | "base" | "init"
    c.grpo.dense_sampling = True  # sample from a dequantized copy of the frozen base: same weights, ~2x faster
    #                               decoding, costs the base linears' float size in memory (off for large models)
    c.grpo.eval_temperature = 0.0  # held-out evaluation: 0 = greedy, else sampled with a fixed seed

    c.model = ConfigDict()
    c.model.source = "smollm2-135m-instruct"  # built-in name, HF model dir, GGUF file, bnb-4bit dir or hub id
    c.model.quantize = "nf4"  # "nf4" | "fp4" | "none": storage of the frozen linears
    c.model.blocksize = 64  # 4-bit quantization block size (QLoRA: 64)
    c.model.double_quant = True  # quantize the absmax constants to 8 bits (QLoRA: on)
    c.model.dtype = "float32"  # compute dtype: float32 on CPU, bfloat16 on GPU/TPU
    c.model.param_dtype = "float32"  # storage of unquantized weights (embeddings, norms)
    c.model.init_from = ""  # a previous run's workdir (e.g. SFT): start from its adapters
    c.model.remat = "none"  # per decoder layer: "none" | "full" | "dots" | "dots_no_batch"
    c.model.attention_impl = "auto"  # "auto" (splash on TPU, cuDNN on GPU, XLA on CPU) | "jax" | "einsum" | "splash" | "cudnn"
    c.model.quant_matmul_impl = "auto"  # 4-bit frozen matmul: "auto" (fused Pallas kernel on TPU, XLA elsewhere) | "xla" | "pallas"

    c.lora = ConfigDict()
    c.lora.r = 16  # adapter rank
    c.lora.alpha = 32.0  # scale s = alpha / r (alpha / sqrt(r) with rslora)
    c.lora.dropout = 0.0  # dropout on the adapter's input (0 keeps the trained and the sampled policy equal)
    c.lora.targets = "all-linear"  # "all-linear", comma-separated names (q_proj,v_proj) or a regex
    c.lora.init = "gaussian"  # "gaussian": A ~ N(0, init_std^2), B = 0 | "peft": kaiming-uniform A
    c.lora.init_std = 0.01  # std of A for init="gaussian"
    c.lora.rslora = False  # rank-stabilised scaling alpha / sqrt(r)
    c.lora.use_dora = False  # DoRA: a trained magnitude per output row rescales W + s B A (peft use_dora)

    c.data = ConfigDict()
    c.data.train = "data/grpo_demo/train.jsonl"  # rows with a prompt column; the other columns go to the rewards
    c.data.eval = "data/grpo_demo/eval.jsonl"  # held-out prompts, answered before, during and after ("" for none)
    c.data.prompt_column = "prompt"  # a string (sent as the user message) or a message list
    c.data.system_prompt = "Answer with a short reasoning, then ##### and the final number."  # prepended
    #                       to prompts without a system message ("" = the chat template's default)
    c.data.pad_to_multiple_of = 16  # training rows fit the longest prompt, rounded up to a multiple of this
    c.data.max_eval_examples = 32  # cap on held-out prompts

    c.optim = ConfigDict()
    c.optim.lr = 1e-3  # peak learning rate (the demo at 2e-3 learns the format but collapses to one answer)
    c.optim.weight_decay = 0.0  # AdamW decoupled weight decay
    c.optim.max_grad_norm = 1.0  # clip to this global gradient norm (0 disables)
    c.optim.warmup_ratio = 0.1  # fraction of optimizer steps of linear warm-up
    c.optim.schedule = "constant"  # "cosine" | "linear" | "constant" after warm-up
    c.optim.b1 = 0.9  # Adam beta1
    c.optim.b2 = 0.999  # Adam beta2
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.offload = False  # keep optimizer state in pinned host memory (paged-optimizer analog)

    c.train = ConfigDict()
    c.train.batch_size = 16  # completions per micro-batch (rows: prompts x num_generations)
    c.train.grad_accum = 1  # micro-batches per optimizer step; one generation batch = batch_size x grad_accum rows
    c.train.max_steps = 12  # optimizer steps
    c.train.log_every = 1  # optimizer steps between metric rows
    c.train.eval_every = 6  # optimizer steps between held-out evaluations (0 = only before and after)
    c.train.checkpoint_every = 4  # optimizer steps between checkpoints (a multiple of grpo.num_iterations)
    c.train.keep_checkpoints = 2  # keep the newest N checkpoints
    c.train.export_peft = True  # write the final adapters in PEFT format (workdir/adapter)
    c.train.wandb_project = ""  # also log to this Weights & Biases project ("" = off; pip install 'qlora_jax[wandb]')
    c.train.wandb_mode = "online"  # "online" | "offline" (no network: files in workdir/wandb, upload with `wandb sync`)

    c.mesh = ConfigDict()
    c.mesh.data = -1  # data-parallel axis size (-1 = all remaining devices)
    c.mesh.fsdp = 1  # parameter/optimizer-sharded data-parallel axis size
    c.mesh.tensor = 1  # tensor-parallel axis size
    return c
