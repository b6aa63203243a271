"""QLoRA KTO of the built-in SmolLM2-135M-Instruct on the shipped unpaired JSON-record set.

    python -m qlora_jax.train --config configs/kto.py [--config.kto.beta=0.2 ...]

KTO (Ethayarajh et al. 2024) as trl 1.16.0's ``KTOTrainer``: rows are single (prompt, completion)
examples labelled desirable or undesirable, no pairs needed; the loss pushes a desirable row's
implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) above, an undesirable row's below, the
batch's KL estimate (mismatched prompt/completion rows of the same micro-batch). The reference is
DPO's: the NF4 base with the adapters switched off, or frozen ``model.init_from`` adapters. Data:
data/kto_demo (made from the DPO demo pairs by data/make_kto_data.py: one side per training pair;
both sides of every held-out pair, so a reward accuracy over same-prompt pairs is defined). Every
other setting is configs/dpo.py's (documented there).
"""

from ml_collections import ConfigDict

from configs.dpo import get_config as _dpo


def get_config() -> ConfigDict:
    c = _dpo()
    del c["dpo"]
    c.workdir = "runs/kto_demo"  # checkpoints, metrics.jsonl, tensorboard/, loss.png, adapters go here
    c.objective = "kto"  # "sft" | "dpo" | "orpo" | "cpo" | "kto" | "grpo"

    c.kto = ConfigDict()
    c.kto.beta = 0.1  # reward scale, the pull towards the reference (trl KTOConfig default 0.1)
    c.kto.loss_type = "kto"  # "kto" | "apo_zero_unpaired" (no KL term), as trl 1.16's KTOTrainer
    c.kto.desirable_weight = 1.0  # weight of desirable rows' losses (trl: keep weight x count ~1-1.33x the other's)
    c.kto.undesirable_weight = 1.0  # weight of undesirable rows' losses
    c.kto.reference = "auto"  # "auto": frozen init_from adapters if set, else adapters off | "base" | "init"

    c.data.train = "data/kto_demo/train.jsonl"  # rows prompt/completion/label (or preference pairs, unpaired on reading)
    c.data.eval = "data/kto_demo/eval.jsonl"  # held-out rows; same-prompt desirable/undesirable pairs give reward accuracy
    c.data.format = "auto"  # rows are recognised by their columns ("auto" only)
    c.data.max_eval_examples = 60  # cap on held-out rows (the first 30 of the demo's 60 pairs, both sides)
    c.data.pad_to_multiple_of = 128  # every batch padded to max_length: the step compiles once (4 forwards each)

    c.train.batch_size = 8  # rows per micro-batch; the KL estimate pairs each with another row's completion (>= 2)
    c.train.max_steps = 12  # optimizer steps (96 of the 300 rows); -1 = derive from epochs
    c.train.eval_every = 0  # optimizer steps between held-out evaluations (0 = only before and after)
    c.train.early_stopping_patience = 0  # (needs eval_every > 0) stop after this many evaluations without a better one
    c.train.checkpoint_every = 6  # optimizer steps between checkpoints
    return c
