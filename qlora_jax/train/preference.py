"""DPO in the trainer: the step objective, held-out preference metrics and early stopping.

The reference policy is never a second copy of the base model. By default it is the same model with
the adapters switched off (``lora_enabled=False``), which is exactly the base when training starts
from fresh adapters. When training starts from earlier adapters (``model.init_from``, e.g. an SFT
run) the reference is those adapters, frozen: a copy of only the LoRA state (megabytes), passed to
the step next to the trained one (``frozen_adapters=True``), as trl does with a PEFT "ref" adapter.
Reference log-probs are computed in the same jit'd step, outside the differentiated function and
under ``stop_gradient``, and without LoRA dropout.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from qlora_jax.data.preference import (
    PreferenceBatchIterator,
    PreferenceStats,
    TokenizedPair,
    prepare_preference,
)
from qlora_jax.dpo import dpo_loss
from qlora_jax.objectives import sequence_logprob
from qlora_jax.train import sharding as shard_lib

log = logging.getLogger(__name__)


def sequence_logps(graphdef, lora, rest, batch, *, lora_enabled: bool = True, key=None,
                   deterministic: bool = True) -> jax.Array:
    """Summed completion log-prob of every row: float32 [rows]."""
    model = nnx.merge(graphdef, lora, rest)
    h = model.hidden_states(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                            lora_enabled=lora_enabled, deterministic=deterministic, rngs=key)
    return sequence_logprob(h, model.lm_head_weight(), batch["targets"], batch["loss_mask"])


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
    """The DPO objective for ``loop.make_step_fns``: the loss is averaged over pairs."""

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
    """Per-pair means of a train step's summed statistics (trl's rewards/* and logps/* logs)."""
    pairs = max(float(m["pairs"]), 1.0)
    chosen, rejected = float(m["rewards_chosen"]) / pairs, float(m["rewards_rejected"]) / pairs
    return {"pairs": float(m["pairs"]), "reward_accuracy": float(m["reward_correct"]) / pairs,
            "rewards_chosen": chosen, "rewards_rejected": rejected, "reward_margin": chosen - rejected,
            "logps_chosen": float(m["logps_chosen"]) / pairs, "logps_rejected": float(m["logps_rejected"]) / pairs}


# -- config -> data ------------------------------------------------------------------------------


def prepare_data(cfg: ConfigDict, tokenizer: Any, pad_id: int):
    """(train pairs, eval pairs, train iterator, train stats) from ``cfg.data``."""
    overflow = "drop" if cfg.data.drop_long else "truncate"
    as_chat = bool(cfg.data.get("text_as_chat", False))
    train, stats = prepare_preference(cfg.data.train, tokenizer, max_length=cfg.data.max_length,
                                      overflow=overflow, text_as_chat=as_chat)
    held_out: list[TokenizedPair] = []
    if cfg.data.eval:
        held_out, _ = prepare_preference(cfg.data.eval, tokenizer, max_length=cfg.data.max_length,
                                         overflow=overflow, text_as_chat=as_chat)
        held_out = held_out[: cfg.data.max_eval_examples]
    it = PreferenceBatchIterator(
        train, batch_size=cfg.train.batch_size, seq_len=cfg.data.max_length,
        group_by_length=cfg.data.group_by_length, pad_to_multiple_of=cfg.data.pad_to_multiple_of,
        pad_id=pad_id, seed=cfg.seed)
    log.info("preference data: %s", stats.summary())
    return train, held_out, it, stats


def data_summary(stats: PreferenceStats) -> dict[str, int]:
    return {"train_examples": stats.kept, "truncated": stats.truncated,
            "dropped": stats.dropped_too_long + stats.dropped_no_completion}


# -- held-out metrics ------------------------------------------------------------------------------


def _logps_fn(graphdef, mesh):
    repl = shard_lib.replicated(mesh)

    def fn(lora, rest, batch, lora_enabled):
        return sequence_logps(graphdef, lora, rest, batch, lora_enabled=lora_enabled)

    return jax.jit(fn, static_argnums=(3,), out_shardings=repl)


class PreferenceEvaluator:
    """Held-out DPO metrics of the current adapters; the reference log-probs are computed once.

    ``reward_accuracy`` is trl's (chosen reward strictly above rejected: 0 before training, where
    policy = reference); ``logp_accuracy`` asks whether the policy itself gives the chosen
    completion the higher summed log-prob (before training: the reference's own preference).
    """

    def __init__(self, graphdef, mesh, pairs: list[TokenizedPair], objective: DPOObjective, *,
                 batch_size: int, seq_len: int, pad_id: int, pad_to_multiple_of: int = 64):
        self.objective = objective
        self.pairs = len(pairs)
        by_length = sorted(pairs, key=len)  # metrics are means over pairs: batch similar lengths together
        it = PreferenceBatchIterator(by_length, batch_size=batch_size, seq_len=seq_len, shuffle=False,
                                     num_epochs=1, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
        self.batches = list(it)
        self._fn = _logps_fn(graphdef, mesh)
        self._ref: list[np.ndarray] | None = None

    def reference_logps(self, lora, rest, ref_lora=None) -> list[np.ndarray]:
        if self._ref is None:
            if self.objective.frozen_adapters:
                self._ref = [np.asarray(self._fn(ref_lora, rest, b, True)) for b in self.batches]
            else:
                self._ref = [np.asarray(self._fn(lora, rest, b, False)) for b in self.batches]
        return self._ref

    def __call__(self, lora, rest, ref_lora=None) -> dict[str, float]:
        ref = self.reference_logps(lora, rest, ref_lora)
        policy = [np.asarray(self._fn(lora, rest, b, True)) for b in self.batches]
        lengths = np.concatenate([b["loss_mask"].sum(-1) for b in self.batches]).astype(np.float32)
        policy_all, ref_all = np.concatenate(policy), np.concatenate(ref)
        o = self.objective
        loss_sum, s = pair_sums(jnp.asarray(policy_all), jnp.asarray(ref_all), jnp.asarray(lengths), beta=o.beta,
                                loss_type=o.loss_type, label_smoothing=o.label_smoothing)
        pairs = max(float(s["pairs"]), 1.0)
        live = (lengths.reshape(-1, 2) > 0).all(-1)
        p = policy_all.reshape(-1, 2)[live]
        m = step_metrics(s)
        return {"loss": float(loss_sum) / pairs, "reward_accuracy": m["reward_accuracy"],
                "rewards_chosen": m["rewards_chosen"], "rewards_rejected": m["rewards_rejected"],
                "reward_margin": m["reward_margin"], "logp_accuracy": float(np.mean(p[:, 0] > p[:, 1])),
                "examples": int(live.sum())}


def eval_row(ev: dict[str, float]) -> dict[str, float]:
    """What metrics.jsonl gets from an evaluation (``eval_`` + name)."""
    return {f"eval_{k}": v for k, v in ev.items() if k != "examples"}


# -- early stopping on held-out reward accuracy ----------------------------------------------------


@dataclasses.dataclass
class EarlyStopping:
    """Best held-out reward accuracy so far; stop after ``patience`` evaluations without a strict
    improvement (patience 0: never stop, but still keep the best)."""

    patience: int = 0
    best: float = -math.inf
    best_step: int = -1
    bad_evals: int = 0
    stopped: bool = False

    def update(self, step: int, value: float) -> bool:
        """Record an evaluation; True when it is a new best."""
        if value > self.best:
            self.best, self.best_step, self.bad_evals = value, step, 0
            return True
        self.bad_evals += 1
        if self.patience and self.bad_evals >= self.patience:
            self.stopped = True
        return False

    def state(self) -> dict[str, Any]:
        return {"patience": self.patience, "best": None if self.best == -math.inf else self.best,
                "best_step": self.best_step, "bad_evals": self.bad_evals, "stopped": self.stopped}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, patience: int) -> EarlyStopping:
        if not state:
            return cls(patience=patience)
        best = state.get("best")
        return cls(patience=patience, best=-math.inf if best is None else float(best),
                   best_step=int(state.get("best_step", -1)), bad_evals=int(state.get("bad_evals", 0)),
                   stopped=bool(state.get("stopped", False)))


__all__ = [
    "DPOObjective", "EarlyStopping", "PreferenceEvaluator", "data_summary", "eval_row", "pair_sums",
    "prepare_data", "sequence_logps", "step_metrics",
]
