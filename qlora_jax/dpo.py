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

from typing import NamedTuple

import jax
import jax.numpy as jnp

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


__all__ = ["LOSS_TYPES", "DPOOutput", "dpo_loss", "reward_accuracy"]
