"""Direct preference optimization losses: pure functions of four sequence log-prob vectors.

For a pair (prompt x, chosen y_w, rejected y_l), every log-prob is summed over the completion
tokens only. With ``logratio(y) = log pi_theta(y|x) - log pi_ref(y|x)``:

    delta   = logratio(y_w) - logratio(y_l)
    reward  = beta * logratio              (the implicit reward trl logs as rewards/chosen, /rejected)

Loss types, as trl 1.16.0 computes them (``DPOTrainer._compute_loss``; mean over pairs is the caller's):

    sigmoid  -log sigmoid(beta * delta)                                   (Rafailov et al.)
    robust   [-(1 - eps) log sigmoid(beta * delta) + eps log sigmoid(-beta * delta)] / (1 - 2 eps)
             eps = label_smoothing in [0, 0.5): the assumed probability a label is flipped
    ipo      (delta_norm - 1 / (2 beta))^2, where each logratio is first divided by its
             completion's token count (trl's length normalisation; beta is IPO's tau)
    hinge    relu(1 - beta * delta)

trl 1.16.0's "sigmoid" ignores ``label_smoothing`` (older trl releases smoothed it, cDPO-style);
we follow the installed version and use ``label_smoothing`` only for "robust".
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from qlora_jax.objectives.base import forward
from qlora_jax.objectives.logprobs import sequence_logprob

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge")


class DPOOutput(NamedTuple):
    """Per pair, float32 [pairs]."""

    losses: jax.Array
    chosen_rewards: jax.Array  # beta * (log pi(y_w|x) - log pi_ref(y_w|x))
    rejected_rewards: jax.Array  # beta * (log pi(y_l|x) - log pi_ref(y_l|x))


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
) -> DPOOutput:
    """Per-pair DPO losses and implicit rewards.

    All four log-prob vectors are ``[pairs]`` sums over completion tokens. ``chosen_lengths`` /
    ``rejected_lengths`` (completion token counts, ``[pairs]``) are needed by "ipo" only; counts
    below 1 are taken as 1, as trl does.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    f32 = jnp.float32
    chosen_logratios = jnp.asarray(policy_chosen_logps, f32) - jnp.asarray(ref_chosen_logps, f32)
    rejected_logratios = jnp.asarray(policy_rejected_logps, f32) - jnp.asarray(ref_rejected_logps, f32)
    delta = chosen_logratios - rejected_logratios
    z = beta * delta
    if loss_type == "sigmoid":
        losses = -jax.nn.log_sigmoid(z)
    elif loss_type == "robust":
        eps = label_smoothing
        losses = (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='ipo' needs chosen_lengths and rejected_lengths (completion token counts)")
        n_chosen = jnp.maximum(jnp.asarray(chosen_lengths, f32), 1.0)
        n_rejected = jnp.maximum(jnp.asarray(rejected_lengths, f32), 1.0)
        delta_norm = chosen_logratios / n_chosen - rejected_logratios / n_rejected
        losses = (delta_norm - 1.0 / (2.0 * beta)) ** 2
    else:  # hinge
        losses = jax.nn.relu(1.0 - z)
    return DPOOutput(losses, beta * chosen_logratios, beta * rejected_logratios)


def reward_accuracy(chosen_rewards: jax.Array, rejected_rewards: jax.Array) -> jax.Array:
    """Fraction of pairs whose chosen reward is strictly larger (ties, e.g. at init, count as wrong)."""
    return jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32))


# -- the objective ---------------------------------------------------------------------------------
#
# The reference policy is never a second copy of the base model. By default it is the same model
# with the adapters switched off (``lora_enabled=False``), which is exactly the base when training
# starts from fresh adapters. When training starts from earlier adapters (``model.init_from``, e.g.
# an SFT run) it is those adapters, frozen: a copy of only the LoRA state (megabytes), passed to the
# step next to the trained one (``frozen_adapters=True``), as trl does with a PEFT "ref" adapter.
# Reference log-probs are computed in the same jit'd step, outside the differentiated function,
# under ``stop_gradient`` and without LoRA dropout.


def sequence_logps(graphdef, lora, rest, batch, *, lora_enabled: bool = True, key=None,
                   deterministic: bool = True) -> jax.Array:
    """Summed completion log-prob of every row: float32 [rows]."""
    model, h = forward(graphdef, lora, rest, batch, lora_enabled=lora_enabled, key=key, deterministic=deterministic)
    return sequence_logprob(h, model.lm_head_weight(), batch["targets"], batch["loss_mask"],
                            logit_soft_cap=model.config.final_logit_softcap)


def pair_sums(policy_logps, ref_logps, completion_lengths, *, beta: float, loss_type: str, label_smoothing: float):
    """Rows interleaved chosen/rejected -> (summed loss, summed statistics) over the live pairs.

    All three inputs are per row ``[2 * pairs]``; ``completion_lengths`` counts each row's loss
    tokens. A pair is live when both its rows have completion tokens; padding pairs add nothing.
    """
    lengths = jnp.asarray(completion_lengths, jnp.float32).reshape(-1, 2)  # [pairs, (chosen, rejected)]
    policy, ref = policy_logps.reshape(-1, 2), ref_logps.reshape(-1, 2)
    out = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=beta, loss_type=loss_type,
                   label_smoothing=label_smoothing, chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1])
    live = ((lengths[:, 0] > 0) & (lengths[:, 1] > 0)).astype(jnp.float32)
    stats = {
        "pairs": jnp.sum(live),
        "tokens": jnp.sum(lengths * live[:, None]),
        "reward_correct": jnp.sum((out.chosen_rewards > out.rejected_rewards).astype(jnp.float32) * live),
        "rewards_chosen": jnp.sum(out.chosen_rewards * live),
        "rewards_rejected": jnp.sum(out.rejected_rewards * live),
        "logps_chosen": jnp.sum(policy[:, 0] * live),
        "logps_rejected": jnp.sum(policy[:, 1] * live),
    }
    return jnp.sum(out.losses * live), stats


@dataclasses.dataclass(frozen=True)
class DPOObjective:
    """The DPO objective for the trainer's step: the loss is averaged over pairs."""

    beta: float
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    frozen_adapters: bool = False  # reference = frozen adapters passed to the step (else adapters off)

    stat_keys = ("pairs", "tokens", "reward_correct", "rewards_chosen", "rewards_rejected",
                 "logps_chosen", "logps_rejected")
    weight_key = "pairs"

    def reference(self, graphdef, lora, rest, batch, ref_lora):
        if self.frozen_adapters:
            logps = sequence_logps(graphdef, ref_lora, rest, batch, lora_enabled=True)
        else:
            logps = sequence_logps(graphdef, lora, rest, batch, lora_enabled=False)
        return jax.lax.stop_gradient(logps)

    def loss_sums(self, graphdef, lora, rest, batch, key, reference):
        logps = sequence_logps(graphdef, lora, rest, batch, key=key, deterministic=False)
        lengths = jnp.sum(batch["loss_mask"].astype(jnp.float32), axis=-1)
        return pair_sums(logps, reference, lengths, beta=self.beta, loss_type=self.loss_type,
                         label_smoothing=self.label_smoothing)


def step_metrics(m: dict[str, Any]) -> dict[str, float]:
    """Per-pair means of a step's summed statistics (trl's rewards/* and logps/* logs)."""
    pairs = max(float(m["pairs"]), 1.0)
    chosen, rejected = float(m["rewards_chosen"]) / pairs, float(m["rewards_rejected"]) / pairs
    return {"pairs": float(m["pairs"]), "reward_accuracy": float(m["reward_correct"]) / pairs,
            "rewards_chosen": chosen, "rewards_rejected": rejected, "reward_margin": chosen - rejected,
            "logps_chosen": float(m["logps_chosen"]) / pairs, "logps_rejected": float(m["logps_rejected"]) / pairs}


__all__ = ["LOSS_TYPES", "DPOObjective", "DPOOutput", "dpo_loss", "pair_sums", "reward_accuracy",
           "sequence_logps", "step_metrics"]
