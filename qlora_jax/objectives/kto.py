"""Kahneman-Tversky optimization (KTO): unpaired desirable / undesirable completions.

Each row is one (prompt x, completion y) labelled desirable or undesirable; no pairs are needed.
With ``logratio(y) = log pi_theta(y|x) - log pi_ref(y|x)`` (completion tokens summed) and a
batch estimate ``z`` of KL(pi_theta || pi_ref), as trl 1.16.0 computes it
(``trl.KTOTrainer._compute_loss``; KTO was promoted from ``trl.experimental.kto`` to the stable
API, and ``trl.experimental.kto`` is a deprecated alias of it):

    kto                 desirable   1 - sigmoid(beta * (logratio - z))          (KTO paper, eq. 7)
                        undesirable 1 - sigmoid(beta * (z - logratio))
    apo_zero_unpaired   desirable   1 - sigmoid(beta * logratio)                (no KL term)
                        undesirable sigmoid(beta * logratio)

    loss = mean over rows of (desirable_weight or undesirable_weight) * row loss

The KL estimate: every row's prompt is paired with *another* row's completion of the same
micro-batch -- trl rotates the completions by one, row i gets the completion of row i - 1 and row
0 that of the last row -- and ``z = max(0, mean over rows of logratio(mismatched y | x))``,
detached. trl builds these rotations on the dataset in chunks of ``per_device_train_batch_size``
and requires sequential sampling so a chunk is a batch; here they are built on the micro-batch
as drawn (shuffled or not), which is the same set of mismatched pairs. Under gradient
accumulation every micro-batch has its own ``z``, as in trl. The policy's log-probs on the
mismatched rows are taken without LoRA dropout (trl's run in train mode, dropout on).

Rewards logged as trl: ``beta * logratio``, averaged over the desirable rows (rewards/chosen) and
the undesirable rows (rewards/rejected); ``kl`` is ``z``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from qlora_jax.objectives.dpo import sequence_logps

LOSS_TYPES = ("kto", "apo_zero_unpaired")
KL_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")  # the KL rows: "kl_" + these


class KTOLosses(NamedTuple):
    """Per row, float32 [rows]: weighted losses and implicit rewards."""

    losses: jax.Array
    rewards: jax.Array  # beta * logratio


def kl_estimate(policy_kl_logps: jax.Array, ref_kl_logps: jax.Array, live: jax.Array) -> jax.Array:
    """``max(0, mean over live rows of policy - reference log-prob)`` on the mismatched rows, detached."""
    live = jnp.asarray(live, jnp.float32)
    diff = jnp.asarray(policy_kl_logps, jnp.float32) - jnp.asarray(ref_kl_logps, jnp.float32)
    mean = jnp.sum(diff * live) / jnp.maximum(jnp.sum(live), 1.0)
    return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


def kto_loss(policy_logps: jax.Array, ref_logps: jax.Array, desirable: jax.Array, kl: jax.Array | float, *,
             beta: float, loss_type: str = "kto", desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> KTOLosses:
    """Weighted per-row KTO losses; ``desirable`` is a bool [rows], ``kl`` the batch's ``z``
    (ignored by "apo_zero_unpaired")."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    f32 = jnp.float32
    logratio = jnp.asarray(policy_logps, f32) - jnp.asarray(ref_logps, f32)
    desirable = jnp.asarray(desirable, bool)
    if loss_type == "kto":
        z = jax.lax.stop_gradient(jnp.asarray(kl, f32))
        good = 1.0 - jax.nn.sigmoid(beta * (logratio - z))
        bad = 1.0 - jax.nn.sigmoid(beta * (z - logratio))
    else:  # apo_zero_unpaired
        good = 1.0 - jax.nn.sigmoid(beta * logratio)
        bad = jax.nn.sigmoid(beta * logratio)
    losses = jnp.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return KTOLosses(losses, beta * logratio)


def row_sums(policy_logps, ref_logps, desirable, lengths, kl, *, beta: float, loss_type: str,
             desirable_weight: float, undesirable_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(summed loss, summed statistics) of one micro-batch over its live rows (completion tokens > 0);
    every input is per row ``[rows]``, ``kl`` the micro-batch's ``z``."""
    lengths = jnp.asarray(lengths, jnp.float32)
    live = (lengths > 0).astype(jnp.float32)
    good = jnp.asarray(desirable, bool) & (live > 0)
    bad = ~jnp.asarray(desirable, bool) & (live > 0)
    out = kto_loss(policy_logps, ref_logps, good, kl, beta=beta, loss_type=loss_type,
                   desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    g, b = good.astype(jnp.float32), bad.astype(jnp.float32)
    logps = jnp.asarray(policy_logps, jnp.float32)
    stats = {
        "examples": jnp.sum(live),
        "desirable": jnp.sum(g),
        "undesirable": jnp.sum(b),
        "tokens": jnp.sum(lengths * live),
        "rewards_chosen": jnp.sum(out.rewards * g),
        "rewards_rejected": jnp.sum(out.rewards * b),
        "logps_chosen": jnp.sum(logps * g),
        "logps_rejected": jnp.sum(logps * b),
        "label_correct": jnp.sum((out.rewards > 0) * g + (out.rewards < 0) * b),
        "kl": jnp.asarray(kl, jnp.float32) * (jnp.sum(live) > 0),
        "batches": (jnp.sum(live) > 0).astype(jnp.float32),
    }
    return jnp.sum(out.losses * live), stats


def kl_batch(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The mismatched rows of a KTO batch, under the usual batch keys."""
    return {k: batch["kl_" + k] for k in KL_KEYS}


def row_lengths(batch: dict[str, jax.Array]) -> jax.Array:
    return jnp.sum(batch["loss_mask"].astype(jnp.float32), axis=-1)


@dataclasses.dataclass(frozen=True)
class KTOObjective:
    """KTO for the trainer's step; the loss is averaged over rows (``weight_key="examples"``).

    The reference policy is DPO's: adapters off, or frozen starting adapters. Batches carry the
    rows (``input_ids``, ...), their KL rows (``kl_input_ids``, ...) and ``desirable`` (the label
    repeated along the row, int32 [rows, length]: every batch array has the same layout).
    """

    beta: float = 0.1
    loss_type: str = "kto"
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    frozen_adapters: bool = False

    stat_keys = ("examples", "desirable", "undesirable", "tokens", "rewards_chosen", "rewards_rejected",
                 "logps_chosen", "logps_rejected", "label_correct", "kl", "batches")
    weight_key = "examples"

    @property
    def uses_kl(self) -> bool:
        return self.loss_type == "kto"

    def _ref_logps(self, graphdef, lora, rest, batch, ref_lora):
        if self.frozen_adapters:
            return sequence_logps(graphdef, ref_lora, rest, batch, lora_enabled=True)
        return sequence_logps(graphdef, lora, rest, batch, lora_enabled=False)

    def reference(self, graphdef, lora, rest, batch, ref_lora):
        """Reference log-probs of the rows and the micro-batch's KL estimate (no gradient)."""
        ref = self._ref_logps(graphdef, lora, rest, batch, ref_lora)
        kl = jnp.float32(0.0)
        if self.uses_kl:
            mismatched = kl_batch(batch)
            policy_kl = sequence_logps(graphdef, lora, rest, mismatched)
            ref_kl = self._ref_logps(graphdef, lora, rest, mismatched, ref_lora)
            kl = kl_estimate(policy_kl, ref_kl, row_lengths(batch) > 0)
        return jax.lax.stop_gradient({"ref_logps": ref, "kl": kl})

    def loss_sums(self, graphdef, lora, rest, batch, key, reference):
        logps = sequence_logps(graphdef, lora, rest, batch, key=key, deterministic=False)
        return self.sums(logps, reference["ref_logps"], batch["desirable"][:, 0] > 0, row_lengths(batch),
                         reference["kl"])

    def sums(self, policy_logps, ref_logps, desirable, lengths, kl):
        return row_sums(policy_logps, ref_logps, desirable, lengths, kl, beta=self.beta, loss_type=self.loss_type,
                        desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight)

    def step_metrics(self, m: dict[str, Any]) -> dict[str, float]:
        """Means of a step's (or an evaluation's) summed statistics, named as the pair objectives'
        rows; trl's rewards/chosen, /rejected are over the desirable, undesirable rows (left out
        when there are none), ``kl`` the mean of the micro-batches' estimates."""
        n, good, bad = float(m["examples"]), float(m["desirable"]), float(m["undesirable"])
        out = {"examples": n, "desirable": good, "undesirable": bad,
               "label_accuracy": float(m["label_correct"]) / max(n, 1.0)}
        if self.uses_kl:
            out["kl"] = float(m["kl"]) / max(float(m["batches"]), 1.0)
        if good:
            out["rewards_chosen"] = float(m["rewards_chosen"]) / good
            out["logps_chosen"] = float(m["logps_chosen"]) / good
        if bad:
            out["rewards_rejected"] = float(m["rewards_rejected"]) / bad
            out["logps_rejected"] = float(m["logps_rejected"]) / bad
        if good and bad:
            out["reward_margin"] = out["rewards_chosen"] - out["rewards_rejected"]
        return out


__all__ = ["KL_KEYS", "LOSS_TYPES", "KTOLosses", "KTOObjective", "kl_batch", "kl_estimate", "kto_loss", "row_sums"]
