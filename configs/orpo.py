"""QLoRA ORPO of the built-in SmolLM2-135M-Instruct on the shipped JSON-record preference set.

    python -m qlora_jax.train --config configs/orpo.py [--config.orpo.beta=0.25 ...]

ORPO (Hong et al. 2024) as trl 1.16.0's ``ORPOTrainer``: the NLL of the chosen sequence plus
``beta`` times the odds-ratio term, on length-averaged log-probs, with no reference model (one
forward pass per step, no SFT stage before it). The same trainer, data, checkpoints and held-out
reward accuracy as DPO (configs/dpo.py). For CPO and SimPO see configs/simpo.py. Every other setting is
configs/dpo.py's (documented there).
"""

from ml_collections import ConfigDict

from configs.dpo import get_config as _dpo


def get_config() -> ConfigDict:
    c = _dpo()
    del c["dpo"]
    c.workdir = "runs/orpo_demo"  # checkpoints, metrics.jsonl, tensorboard/, loss.png, adapters go here
    c.objective = "orpo"  # "sft" | "dpo" | "orpo" | "cpo" | "grpo"

    c.orpo = ConfigDict()
    c.orpo.beta = 0.1  # lambda, the weight of the odds-ratio term against the NLL (trl default 0.1)

    c.data.train_on_prompt = True  # the NLL term covers prompt + chosen completion, as trl's ORPO (False: completion)
    return c
