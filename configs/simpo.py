"""QLoRA SimPO (or CPO) of the built-in SmolLM2-135M-Instruct on the shipped JSON-record preference set.

    python -m qlora_jax.train --config configs/simpo.py [--config.cpo.simpo_gamma=0.5 ...]

As in trl 1.16.0, SimPO (Meng et al. 2024) is ``CPOTrainer`` with ``loss_type="simpo"`` and
``cpo_alpha=0``: -log sigmoid(beta * (avg log p(chosen) - avg log p(rejected)) - gamma), no
reference model. CPO (Xu et al. 2024) is ``loss_type="sigmoid"`` with ``cpo_alpha=1`` (a chosen
NLL term); "hinge" and "ipo" are its other loss types, and ``cpo.alpha`` != 0 is AlphaPO's reward
shape. The same trainer, data, checkpoints and held-out reward accuracy as DPO; every other
setting is configs/dpo.py's (documented there).
"""

from ml_collections import ConfigDict

from configs.dpo import get_config as _dpo


def get_config() -> ConfigDict:
    c = _dpo()
    del c["dpo"]
    c.workdir = "runs/simpo_demo"  # checkpoints, metrics.jsonl, tensorboard/, loss.png, adapters go here
    c.objective = "cpo"  # "sft" | "dpo" | "orpo" | "cpo" | "grpo" (SimPO is a CPO loss type, as in trl)

    c.cpo = ConfigDict()
    c.cpo.loss_type = "simpo"  # "sigmoid" (CPO) | "hinge" | "ipo" | "simpo", as trl 1.16's CPOTrainer
    c.cpo.beta = 2.0  # reward scale (SimPO paper: 2.0-2.5; trl's CPOConfig default 0.1 suits "sigmoid")
    c.cpo.simpo_gamma = 1.0  # "simpo" only: target reward margin (paper: gamma / beta ~ 0.3-0.8)
    c.cpo.cpo_alpha = 0.0  # weight of the chosen-completion NLL (SimPO: 0; CPO / CPO-SimPO: 1.0)
    c.cpo.label_smoothing = 0.0  # "sigmoid" / "simpo" only: assumed probability a preference label is flipped
    c.cpo.alpha = 0.0  # AlphaPO reward shape (1 - p^-alpha) / alpha; 0 = log-prob rewards

    c.data.train_on_prompt = False  # the NLL term (cpo_alpha > 0) covers the chosen completion only, as trl
    return c
