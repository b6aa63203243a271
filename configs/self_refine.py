"""Seed 000's two-stage self-refinement on a yes/no task: K-fold CV x S seeds, QLoRA SFT.

    python -m qlora_jax.pipelines.self_refine --config configs/self_refine.py        # seed 000: 5 x 5
    python -m qlora_jax.pipelines.self_refine --config configs/self_refine.py:demo   # 2 x 1, minutes on CPU
    ... --config.pipeline.shard=1/4   # this host runs the (fold, seed) jobs with index % 4 == 1

The trainer fields (model, lora, data, optim, train, mesh) are those of configs/sft.py, with seed
000's values: LoRA r=32, alpha=1, dropout 0.1 on all seven projections, A ~ N(0, 0.01^2), B = 0;
AdamW 2e-3, weight decay 0.01, clip 0.3, warm-up 0.3, cosine, gradient accumulation 16; 2 epochs
in Stage 1 and 4 in Stage 2. The ``pipeline`` section is the pipeline's own.
"""

import importlib.util
from pathlib import Path

from ml_collections import ConfigDict


def _sft_config() -> ConfigDict:
    """configs/sft.py's get_config(), loaded by path so that this file works from any directory."""
    spec = importlib.util.spec_from_file_location("_sft_config", Path(__file__).with_name("sft.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(preset: str = "") -> ConfigDict:
    c = _sft_config()
    c.workdir = "runs/self_refine"  # the pipeline's directory: plan, per-job trainer workdirs, reports
    c.seed = 0  # seed of (fold, seed) job s is seed + s (LoRA init, dropout, data order)

    c.model.init_from = ""  # set per job: Stage 2 starts from the Stage-1 adapters of its (fold, seed)

    c.lora.r = 32  # seed 000
    c.lora.alpha = 1.0  # seed 000: scale alpha / r = 1/32
    c.lora.dropout = 0.1  # seed 000
    c.lora.targets = "all-linear"  # q, k, v, o, gate, up, down (seed 000's "Q, K, V and MLP")
    c.lora.init = "gaussian"  # A ~ N(0, init_std^2), B = 0 (seed 000)
    c.lora.init_std = 0.01  # seed 000

    c.data.train = ""  # set per job by the pipeline (the job's train.jsonl)
    c.data.eval = ""  # set per job when pipeline.trainer_eval is on (the held-out fold)
    c.data.format = "chat"  # the pipeline writes {"messages": [...]} rows
    c.data.max_length = 160  # tokens per example; the pipeline fails early if a prompt would not fit
    c.data.pad_to_multiple_of = 16  # short prompts: finer padding buckets than the SFT demo

    c.optim.lr = 2e-3  # seed 000
    c.optim.weight_decay = 0.01  # seed 000
    c.optim.max_grad_norm = 0.3  # seed 000
    c.optim.warmup_ratio = 0.3  # seed 000
    c.optim.schedule = "cosine"  # seed 000

    c.train.batch_size = 1  # micro-batch (the seed does not give it; artidoro/qlora's 1 x 16)
    c.train.grad_accum = 16  # seed 000
    c.train.epochs = 2.0  # unused: the pipeline sets pipeline.stage1_epochs / stage2_epochs per stage
    c.train.checkpoint_every = 50  # optimizer steps between checkpoints within a job (and at its end)
    c.train.keep_checkpoints = 1  # the newest checkpoint per job (the handoff and resume read it)
    c.train.export_peft = False  # PEFT export of every job's adapters (K x S x 2 directories)

    c.pipeline = ConfigDict()
    c.pipeline.data = "data/self_refine_demo/samples.jsonl"  # JSONL/JSON/CSV/parquet with one sample per row
    c.pipeline.id_field = "id"  # unique sample id column ("" = use the row number)
    c.pipeline.prompt_field = "prompt"  # the question, sent as the user message
    c.pipeline.label_field = "label"  # yes/no (also true/false, 1/0)
    c.pipeline.folds = 5  # K: cross-validation folds (stratified by label)
    c.pipeline.seeds = 5  # S: training seeds per fold; K x S adapters per stage
    c.pipeline.fold_seed = 0  # seeds the fold assignment (the same folds for every training seed)
    c.pipeline.stage1_epochs = 2.0  # seed 000
    c.pipeline.stage2_epochs = 4.0  # seed 000
    c.pipeline.answer_words = "yes,no"  # the two answers; each must be one token after the assistant prompt
    c.pipeline.system_prompt = ""  # system message of every prompt ("" = the chat template's default)
    # The Stage-2 prompt. Fields: {prompt} (the Stage-1 prompt), {stage1_answer} (yes/no),
    # {llr} (Stage-1 log-likelihood ratio), {p_yes} (Stage-1 restricted-softmax p(yes)).
    c.pipeline.stage2_template = "{prompt}\nA previous model answered {stage1_answer} (log-likelihood ratio {llr:+.2f})."
    c.pipeline.temperature = 1.0  # softmax temperature of the yes/no scores (rescales LLR and p; not the ranking)
    c.pipeline.score_batch_size = 16  # prompts per forward pass when scoring a held-out fold
    c.pipeline.trainer_eval = False  # give the trainer the held-out fold as eval data (eval loss before/after)
    c.pipeline.shard = "0/1"  # "i/n": run only the (fold, seed) jobs with index % n == i (index = seed * K + fold)
    c.pipeline.wait_minutes = 120.0  # Stage 2 of a seed waits this long for other shards' Stage-1 folds
    c.pipeline.report_only = False  # train nothing; aggregate the finished jobs into the reports

    if preset == "demo":
        # Minutes on a 2-core CPU with SmolLM2-135M: 2 folds x 1 seed, a smaller and louder
        # adapter, many small optimizer steps (the discrimination appears after ~25 steps of 4;
        # with 16-example steps 2 epochs are 17 steps and the model stays at the class prior),
        # a short system message instead of SmolLM2's default (20 fewer tokens per example),
        # and 2 Stage-2 epochs instead of 4.
        c.workdir = "runs/self_refine_demo"
        c.pipeline.folds = 2
        c.pipeline.seeds = 1
        c.pipeline.stage2_epochs = 2.0
        c.pipeline.system_prompt = "Answer yes or no."
        c.lora.r = 8
        c.lora.alpha = 16.0
        c.train.batch_size = 4
        c.train.grad_accum = 1
        c.train.checkpoint_every = 20
    elif preset:
        raise ValueError(f"configs/self_refine.py: unknown preset {preset!r} (known: 'demo')")
    return c
