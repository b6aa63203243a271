"""Reference-free paired preference objectives: ORPO and CPO (SimPO is CPO's loss type "simpo").

No reference policy: the loss is a function of the policy's own log-probs of the chosen (y_w) and
rejected (y_l) completions, so the step runs one forward pass (``reference`` returns None). As in
trl 1.16.0 (``trl.experimental.orpo.ORPOTrainer``, ``trl.experimental.cpo.CPOTrainer``), with
``logp(y)`` the completion's log-prob summed over its tokens and ``avg(y) = logp(y) / |y|``:

ORPO (``ORPOTrainer.odds_ratio_loss`` + ``get_batch_loss_metrics``; beta is the paper's lambda)

    log_odds = (avg(y_w) - avg(y_l)) - (log(1 - exp(avg(y_w))) - log(1 - exp(avg(y_l))))
    loss     = NLL(y_w) - beta * mean_pairs log sigmoid(log_odds)

CPO (``CPOTrainer.cpo_loss`` + ``get_batch_loss_metrics``), on ``l(y) = avg(y)`` for "ipo" and
"simpo", ``logp(y)`` for "sigmoid" and "hinge"; with AlphaPO's ``alpha != 0`` each ``l`` is first
mapped to ``r = (1 - exp(l)^-alpha) / alpha``; ``d = l(y_w) - l(y_l)`` (or ``r`` difference),
``eps = label_smoothing``:

    sigmoid  -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)
    simpo    the same with d - gamma / beta   (SimPO: -log sigmoid(beta d - gamma) at eps = 0)
    hinge    relu(1 - beta d)
    ipo      (d - 1 / (2 beta))^2
    loss     = mean_pairs + cpo_alpha * NLL(y_w)

SimPO as its paper defines it is CPO with ``loss_type="simpo"`` and ``cpo_alpha=0`` (trl's
"alphapo" spelling sets exactly that).

``NLL(y_w)`` is trl's ``nn.CrossEntropyLoss()`` over the chosen rows of a forward: the token mean
over the micro-batch's chosen completions (CPO) or chosen prompt + completion (ORPO; here
``nll_on_prompt``, the config's ``data.train_on_prompt``). It is a mean per forward, not per pair:
a micro-batch of P live pairs adds ``P * NLL`` to the pair-summed loss the step divides by the
step's pairs. One micro-batch per step gives trl's loss exactly; several equal micro-batches give
the mean of their losses, which is what trl's trainer does under gradient accumulation.

Rewards logged as trl does: ``beta * l(y)`` (``beta * r`` with AlphaPO), ORPO ``beta * avg(y)``;
``rewards/accuracies`` counts chosen > rejected strictly; ORPO also logs ``log_odds_ratio`` (mean
log sigmoid(log_odds)) and ``log_odds_chosen`` (mean log_odds). trl's ``logits/chosen`` (the mean
logit over padded rows and the vocabulary) is not computed: the logits are never formed here.

A pair is live when both completions have tokens; padding pairs add nothing. Where an average
log-prob is exactly 0 (every token certain) trl's ``log1mexp`` gives -inf and its gradient NaN;
here the log1mexp argument is capped at -1e-30, finite and equal to trl everywhere trl is finite.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from qlora_jax.objectives.base import forward
from qlora_jax.objectives.logprobs import token_nll

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
_LOG_HALF = -0.6931471805599453


class PairLosses(NamedTuple):
    """Per pair, float32 [pairs]."""

    losses: jax.Array
    chosen_rewards: jax.Array
    rejected_rewards: jax.Array


class ORPOLosses(NamedTuple):
    """Per pair, float32 [pairs]: ``losses = -beta * log_odds_ratio`` (the NLL term is separate)."""

    losses: jax.Array
    chosen_rewards: jax.Array  # beta * avg log p(y_w|x)
    rejected_rewards: jax.Array  # beta * avg log p(y_l|x)
    log_odds_ratio: jax.Array  # log sigmoid(log_odds)
    log_odds: jax.Array


def log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 - exp(x))`` for x <= 0, as trl's ``log1mexp`` (branch at -log 2), with finite gradients:
    each branch sees only the arguments it is used for, and x is capped at -1e-30."""
    x = jnp.minimum(x, -1e-30)
    low = x < _LOG_HALF
    a = jnp.where(low, x, _LOG_HALF)
    b = jnp.where(low, _LOG_HALF, x)
    return jnp.where(low, jnp.log1p(-jnp.exp(a)), jnp.log(-jnp.expm1(b)))


def orpo_loss(chosen_logps: jax.Array, rejected_logps: jax.Array, *, beta: float) -> ORPOLosses:
    """ORPO's odds-ratio term per pair (trl ``ORPOTrainer.odds_ratio_loss``, sign flipped to a loss).

    ``chosen_logps`` / ``rejected_logps``: length-averaged completion log-probs ``[pairs]``.
    """
    w = jnp.asarray(chosen_logps, jnp.float32)
    l = jnp.asarray(rejected_logps, jnp.float32)  # noqa: E741
    log_odds = (w - l) - (log1mexp(w) - log1mexp(l))
    ratio = jax.nn.log_sigmoid(log_odds)
    return ORPOLosses(-beta * ratio, beta * w, beta * l, ratio, log_odds)


def cpo_loss(chosen_logps: jax.Array, rejected_logps: jax.Array, *, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, simpo_gamma: float = 0.5, alpha: float = 0.0) -> PairLosses:
    """CPO / SimPO per pair (trl ``CPOTrainer.cpo_loss``).

    The inputs are what trl feeds it: summed completion log-probs for "sigmoid" and "hinge",
    length-averaged ones for "ipo" and "simpo" (:func:`pair_logps`). ``alpha`` != 0 is AlphaPO's
    reward ``(1 - p^-alpha) / alpha`` with ``p = exp(logp)``.
    """
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {CPO_LOSS_TYPES}, got {loss_type!r}")
    w = jnp.asarray(chosen_logps, jnp.float32)
    l = jnp.asarray(rejected_logps, jnp.float32)  # noqa: E741
    if alpha:
        w, l = -jnp.expm1(-alpha * w) / alpha, -jnp.expm1(-alpha * l) / alpha  # noqa: E741
    d = w - l
    if loss_type == "simpo":
        d = d - simpo_gamma / beta
    eps = label_smoothing
    if loss_type in ("sigmoid", "simpo"):
        losses = -(1.0 - eps) * jax.nn.log_sigmoid(beta * d) - eps * jax.nn.log_sigmoid(-beta * d)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * d)
    else:  # ipo
        losses = (d - 1.0 / (2.0 * beta)) ** 2
    return PairLosses(losses, beta * w, beta * l)


def pair_logps(row_logps: jax.Array, row_lengths: jax.Array, *, average: bool) -> tuple[jax.Array, jax.Array]:
    """Rows interleaved chosen/rejected -> (chosen, rejected) ``[pairs]`` log-probs, summed or divided
    by the completion's token count (at least 1: a padding row gives 0, not trl's 0/0)."""
    logps = jnp.asarray(row_logps, jnp.float32)
    if average:
        logps = logps / jnp.maximum(jnp.asarray(row_lengths, jnp.float32), 1.0)
    logps = logps.reshape(-1, 2)
    return logps[:, 0], logps[:, 1]


# -- per-row terms of one forward ------------------------------------------------------------------


class RowTerms(NamedTuple):
    """Per row of an interleaved pair batch, float32 [rows]."""

    logps: jax.Array  # summed completion log-prob
    lengths: jax.Array  # completion tokens
    nll: jax.Array  # summed NLL over the NLL-term tokens (chosen rows only; 0 on rejected rows)
    nll_tokens: jax.Array


def nll_mask(batch: dict[str, jax.Array], *, nll_on_prompt: bool) -> jax.Array:
    """Target positions of the NLL term ``[rows, seq]`` bool: the chosen rows' completion targets, or
    with ``nll_on_prompt`` every position whose next token is in the same sequence (trl ORPO's
    labels = input_ids where attended, shifted by one)."""
    if nll_on_prompt:
        seg = batch["segment_ids"]
        same = (seg[:, :-1] > 0) & (seg[:, :-1] == seg[:, 1:])
        mask = jnp.pad(same, ((0, 0), (0, 1)))
    else:
        mask = batch["loss_mask"] > 0
    chosen = (jnp.arange(mask.shape[0]) % 2 == 0)[:, None]
    return mask & chosen


def row_terms(hidden: jax.Array, head_weight: jax.Array, batch: dict[str, jax.Array], *,
              nll_on_prompt: bool = False, logit_soft_cap: float | None = None) -> RowTerms:
    """Completion log-probs and the NLL term's sums from final hidden states ``[rows, seq, d]``; the
    vocabulary projection is paid only on completion tokens (and the chosen prompts for ORPO)."""
    completion = batch["loss_mask"] > 0
    nll_on = nll_mask(batch, nll_on_prompt=nll_on_prompt)
    nll = token_nll(hidden, head_weight, batch["targets"], completion | nll_on,
                    logit_soft_cap=logit_soft_cap)  # [rows, seq], 0 elsewhere
    f32 = jnp.float32
    return RowTerms(-jnp.sum(nll * completion, -1), jnp.sum(completion.astype(f32), -1),
                    jnp.sum(nll * nll_on, -1), jnp.sum(nll_on.astype(f32), -1))


# -- the objectives --------------------------------------------------------------------------------

BASE_STATS = ("pairs", "tokens", "reward_correct", "rewards_chosen", "rewards_rejected", "logps_chosen",
              "logps_rejected", "logp_correct", "nll")


@dataclasses.dataclass(frozen=True)
class _ReferenceFree:
    """Shared by ORPO and CPO: one forward, per-pair losses plus a weighted NLL term, averaged over
    pairs (``weight_key``). Subclasses give :meth:`pair_losses`, ``average`` and ``nll_weight``."""

    stat_keys = BASE_STATS
    weight_key = "pairs"
    frozen_adapters = False

    def reference(self, graphdef, lora, rest, batch, ref_lora):
        return None  # no reference policy: the step runs no second forward

    def loss_sums(self, graphdef, lora, rest, batch, key, reference):
        return self.sums(graphdef, lora, rest, batch, key=key, deterministic=False)

    def sums(self, graphdef, lora, rest, batch, *, key=None, deterministic=True):
        """(summed loss, summed statistics) of a pair batch under the given adapters."""
        model, h = forward(graphdef, lora, rest, batch, key=key, deterministic=deterministic)
        return self.sums_from_hidden(h, model.lm_head_weight(), batch, logit_soft_cap=model.config.final_logit_softcap)

    def sums_from_hidden(self, hidden, head_weight, batch, *, logit_soft_cap=None):
        return self.pair_sums(row_terms(hidden, head_weight, batch, nll_on_prompt=self.nll_on_prompt,
                                        logit_soft_cap=logit_soft_cap))

    def pair_sums(self, rows: RowTerms) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(sum over live pairs of the loss, statistics); the NLL term enters as ``pairs * NLL``."""
        lengths = rows.lengths.reshape(-1, 2)
        live = ((lengths[:, 0] > 0) & (lengths[:, 1] > 0)).astype(jnp.float32)
        chosen, rejected = pair_logps(rows.logps, rows.lengths, average=self.average)
        out, extra = self.pair_losses(chosen, rejected)
        pairs = jnp.sum(live)
        live_rows = jnp.repeat(live, 2)
        nll = jnp.sum(rows.nll * live_rows) / jnp.maximum(jnp.sum(rows.nll_tokens * live_rows), 1.0)
        sums = rows.logps.reshape(-1, 2)

        def total(x):
            return jnp.sum(x * live)

        stats = {
            "pairs": pairs,
            "tokens": jnp.sum(lengths * live[:, None]),
            "reward_correct": total((out.chosen_rewards > out.rejected_rewards).astype(jnp.float32)),
            "rewards_chosen": total(out.chosen_rewards),
            "rewards_rejected": total(out.rejected_rewards),
            "logps_chosen": total(chosen),
            "logps_rejected": total(rejected),
            "logp_correct": total((sums[:, 0] > sums[:, 1]).astype(jnp.float32)),
            "nll": pairs * nll,
            **{k: total(v) for k, v in extra.items()},
        }
        return total(out.losses) + self.nll_weight * pairs * nll, stats

    def step_metrics(self, m: dict[str, Any]) -> dict[str, float]:
        """Per-pair means of a step's (or an evaluation's) summed statistics, named as the DPO rows."""
        pairs = max(float(m["pairs"]), 1.0)
        chosen, rejected = float(m["rewards_chosen"]) / pairs, float(m["rewards_rejected"]) / pairs
        out = {"pairs": float(m["pairs"]), "reward_accuracy": float(m["reward_correct"]) / pairs,
               "rewards_chosen": chosen, "rewards_rejected": rejected, "reward_margin": chosen - rejected,
               "logps_chosen": float(m["logps_chosen"]) / pairs, "logps_rejected": float(m["logps_rejected"]) / pairs}
        if self.nll_weight:  # trl logs nll_loss = 0 when it does not compute it (cpo_alpha = 0): left out
            out["nll_loss"] = float(m["nll"]) / pairs
        out.update({k: float(m[k]) / pairs for k in self.stat_keys if k not in BASE_STATS})
        return out


@dataclasses.dataclass(frozen=True)
class ORPOObjective(_ReferenceFree):
    """ORPO: chosen NLL + beta * odds-ratio term, on length-averaged log-probs."""

    beta: float = 0.1
    nll_on_prompt: bool = True  # trl 1.16: the NLL covers the chosen prompt and completion

    stat_keys = BASE_STATS + ("log_odds_ratio", "log_odds_chosen")
    average = True
    nll_weight = 1.0

    def pair_losses(self, chosen, rejected):
        out = orpo_loss(chosen, rejected, beta=self.beta)
        return PairLosses(out.losses, out.chosen_rewards, out.rejected_rewards), {
            "log_odds_ratio": out.log_odds_ratio, "log_odds_chosen": out.log_odds}


@dataclasses.dataclass(frozen=True)
class CPOObjective(_ReferenceFree):
    """CPO and SimPO (``loss_type="simpo"``, ``cpo_alpha=0``), plus ``cpo_alpha`` * chosen NLL."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    alpha: float = 0.0  # AlphaPO reward shape (0: log-prob rewards)
    nll_on_prompt: bool = False  # trl 1.16: the NLL covers the chosen completion only

    @property
    def average(self) -> bool:
        return self.loss_type in ("ipo", "simpo")  # trl: average_log_prob for these two

    @property
    def nll_weight(self) -> float:
        return self.cpo_alpha

    def pair_losses(self, chosen, rejected):
        return cpo_loss(chosen, rejected, beta=self.beta, loss_type=self.loss_type,
                        label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma, alpha=self.alpha), {}


__all__ = ["CPO_LOSS_TYPES", "CPOObjective", "ORPOLosses", "ORPOObjective", "PairLosses", "RowTerms", "cpo_loss",
           "log1mexp", "nll_mask", "orpo_loss", "pair_logps", "row_terms"]
