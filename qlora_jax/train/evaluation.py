"""Held-out evaluation during training: SFT loss and exact match, preference metrics (DPO; ORPO and
CPO without a reference; KTO on unpaired rows), and early stopping on a held-out metric. Each evaluator compiles its
forward once and is called with the current adapters."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import data as data_lib
from qlora_jax.data.preference import PreferenceBatchIterator, TokenizedPair
from qlora_jax.objectives import dpo as dpo_lib
from qlora_jax.objectives.sft import row_stats
from qlora_jax.train import sharding as shard_lib


def _replicated_jit(fn, mesh):
    """``fn(lora, rest, batch, lora_enabled)`` jit'd with ``lora_enabled`` static and replicated outputs."""
    return jax.jit(fn, static_argnums=(3,), out_shardings=shard_lib.replicated(mesh))


def _pair_batches(pairs: list[TokenizedPair], batch_size: int, seq_len: int, pad_id: int,
                  pad_to_multiple_of: int) -> list[dict]:
    """Held-out pairs in fixed batches, similar lengths together (metrics are means over pairs)."""
    it = PreferenceBatchIterator(sorted(pairs, key=len), batch_size=batch_size, seq_len=seq_len, shuffle=False,
                                 num_epochs=1, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
    return list(it)


class SFTEvaluator:
    """Eval loss (per loss token) and exact match: every completion token is the argmax under
    teacher forcing -- exactly the examples greedy decoding would reproduce."""

    def __init__(self, graphdef, mesh, examples, *, batch_size: int, seq_len: int, pad_id: int):
        self.examples, self.batch_size, self.seq_len, self.pad_id = examples, batch_size, seq_len, pad_id
        self._fn = _replicated_jit(lambda lora, rest, batch, on: row_stats(graphdef, lora, rest, batch, on), mesh)

    def __call__(self, lora, rest, ref_lora=None, *, lora_enabled: bool = True) -> dict[str, float]:
        if not self.examples:
            return {}
        it = data_lib.BatchIterator(self.examples, batch_size=self.batch_size, seq_len=self.seq_len, pack=False,
                                    group_by_length=False, shuffle=False, pad_id=self.pad_id, num_epochs=1)
        nll = tok = exact = rows = 0.0
        for batch in it:
            s, n, c = (np.asarray(x) for x in self._fn(lora, rest, batch, lora_enabled))
            live = n > 0
            nll += s[live].sum()
            tok += n[live].sum()
            exact += (c[live] == n[live]).sum()
            rows += live.sum()
        return {"loss": float(nll / max(tok, 1)), "exact_match": float(exact / max(rows, 1)), "examples": int(rows)}


class PreferenceEvaluator:
    """Held-out DPO metrics of the current adapters; the reference log-probs are computed once.

    ``reward_accuracy`` is trl's (chosen reward strictly above rejected: 0 before training, where
    policy = reference); ``logp_accuracy`` asks whether the policy itself gives the chosen
    completion the higher summed log-prob (before training: the reference's own preference).
    """

    def __init__(self, graphdef, mesh, pairs: list[TokenizedPair], objective: dpo_lib.DPOObjective, *,
                 batch_size: int, seq_len: int, pad_id: int, pad_to_multiple_of: int = 64):
        self.objective = objective
        self.pairs = len(pairs)
        self.batches = _pair_batches(pairs, batch_size, seq_len, pad_id, pad_to_multiple_of)
        self._fn = _replicated_jit(
            lambda lora, rest, batch, on: dpo_lib.sequence_logps(graphdef, lora, rest, batch, lora_enabled=on), mesh)
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
        loss_sum, s = dpo_lib.pair_sums(jnp.asarray(policy_all), jnp.asarray(ref_all), jnp.asarray(lengths),
                                        beta=o.beta, loss_type=o.loss_type, label_smoothing=o.label_smoothing)
        pairs = max(float(s["pairs"]), 1.0)
        live = (lengths.reshape(-1, 2) > 0).all(-1)
        p = policy_all.reshape(-1, 2)[live]
        m = dpo_lib.step_metrics(s)
        return {"loss": float(loss_sum) / pairs, "reward_accuracy": m["reward_accuracy"],
                "rewards_chosen": m["rewards_chosen"], "rewards_rejected": m["rewards_rejected"],
                "reward_margin": m["reward_margin"], "logp_accuracy": float(np.mean(p[:, 0] > p[:, 1])),
                "examples": int(live.sum())}


class ReferenceFreeEvaluator:
    """Held-out metrics of a reference-free pair objective (ORPO, CPO/SimPO): its loss and trl's
    statistics, over fixed batches of ``batch_size`` pairs (the NLL term is a mean per batch, as
    in training); ``logp_accuracy`` as for DPO (summed log p(chosen) > log p(rejected))."""

    def __init__(self, graphdef, mesh, pairs: list[TokenizedPair], objective, *, batch_size: int, seq_len: int,
                 pad_id: int, pad_to_multiple_of: int = 64):
        self.objective = objective
        self.batches = _pair_batches(pairs, batch_size, seq_len, pad_id, pad_to_multiple_of)
        self._fn = jax.jit(lambda lora, rest, batch: objective.sums(graphdef, lora, rest, batch),
                           out_shardings=shard_lib.replicated(mesh))

    def __call__(self, lora, rest, ref_lora=None) -> dict[str, float]:
        loss, totals = 0.0, dict.fromkeys(self.objective.stat_keys, 0.0)
        for b in self.batches:
            s, stats = self._fn(lora, rest, b)
            loss += float(s)
            for k in totals:
                totals[k] += float(stats[k])
        pairs = max(totals["pairs"], 1.0)
        m = self.objective.step_metrics(totals)
        del m["pairs"]
        return {"loss": loss / pairs, **m, "logp_accuracy": totals["logp_correct"] / pairs,
                "examples": int(totals["pairs"])}


class KTOEvaluator:
    """Held-out KTO metrics of the current adapters over fixed batches of ``batch_size`` rows (each
    with its KL rows, as in training); the reference log-probs are computed once.

    Besides trl's statistics (loss, rewards/chosen, /rejected, kl) and ``label_accuracy`` (the
    reward's sign agrees with the label; 0 before training, where policy = reference): where the
    held-out set has desirable and undesirable completions of the same prompt, ``reward_accuracy``
    and ``logp_accuracy`` over every such (desirable, undesirable) combination, as DPO's
    (``pairs`` of them; both left out when there is none).
    """

    def __init__(self, graphdef, mesh, rows, objective, *, batch_size: int, seq_len: int, pad_id: int,
                 pad_to_multiple_of: int = 64):
        from qlora_jax.data.unpaired import UnpairedBatchIterator
        from qlora_jax.objectives import kto as kto_lib

        self.objective, self.kto = objective, kto_lib
        self.batches, order = [], []
        if rows:
            order = sorted(rows, key=len)  # similar lengths together
            batches = list(UnpairedBatchIterator(order, batch_size=batch_size, seq_len=seq_len, shuffle=False,
                                                 num_epochs=1, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of))
            # One width for every batch, rows and KL rows under the same keys: the forward compiles
            # once per adapter setting (compiles, not FLOPs, dominate a held-out pass on CPU).
            width = max(b["input_ids"].shape[1] for b in batches)
            for b in batches:
                b.update({k: np.pad(v, ((0, 0), (0, width - v.shape[1])),
                                    constant_values=pad_id if k.endswith(("input_ids", "targets")) else 0)
                          for k, v in b.items()})
            self.batches = batches
        self.live = [b["loss_mask"].sum(-1) > 0 for b in self.batches]
        self.pairs = self._same_prompt_pairs(order)
        self._fn = _replicated_jit(
            lambda lora, rest, batch, on: dpo_lib.sequence_logps(graphdef, lora, rest, batch, lora_enabled=on), mesh)
        self._ref: list[tuple[np.ndarray, np.ndarray | None]] | None = None

    @staticmethod
    def _same_prompt_pairs(rows) -> tuple[np.ndarray, np.ndarray]:
        """Indices (into the evaluation order) of every (desirable, undesirable) row of one prompt."""
        by_prompt: dict[bytes, tuple[list[int], list[int]]] = {}
        for i, r in enumerate(rows):
            key = r.example.input_ids[:r.prompt_length].tobytes()
            by_prompt.setdefault(key, ([], []))[0 if r.desirable else 1].append(i)
        good = [(g, b) for gs, bs in by_prompt.values() for g in gs for b in bs]
        return tuple(np.asarray(x, np.int64) for x in zip(*good)) if good else (np.zeros(0, np.int64),) * 2

    def _logps(self, lora, batch, on: bool):
        return np.asarray(self._fn(lora, self.rest, {k: batch[k] for k in self.kto.KL_KEYS}, on))

    def reference_logps(self, lora, rest, ref_lora=None):
        if self._ref is None:
            self.rest = rest
            frozen = self.objective.frozen_adapters
            adapters, on = (ref_lora, True) if frozen else (lora, False)
            kl = self.objective.uses_kl
            self._ref = [(self._logps(adapters, b, on), self._logps(adapters, self.kto.kl_batch(b), on) if kl else None)
                         for b in self.batches]
        return self._ref

    def __call__(self, lora, rest, ref_lora=None) -> dict[str, float]:
        self.rest = rest
        ref = self.reference_logps(lora, rest, ref_lora)
        o = self.objective
        loss, totals, rewards, logps = 0.0, dict.fromkeys(o.stat_keys, 0.0), [], []
        for b, (ref_main, ref_kl), live in zip(self.batches, ref, self.live):
            policy = self._logps(lora, b, True)
            kl = 0.0
            if o.uses_kl:
                kl = self.kto.kl_estimate(self._logps(lora, self.kto.kl_batch(b), True), ref_kl, live)
            s, stats = o.sums(jnp.asarray(policy), jnp.asarray(ref_main), b["desirable"][:, 0] > 0,
                              b["loss_mask"].sum(-1), kl)
            loss += float(s)
            for k in totals:
                totals[k] += float(stats[k])
            rewards.append(o.beta * (policy - ref_main)[live])
            logps.append(policy[live])
        m = o.step_metrics(totals)
        out = {"loss": loss / max(totals["examples"], 1.0), **{k: v for k, v in m.items() if k != "examples"},
               "examples": int(totals["examples"])}
        g, b = self.pairs
        if g.size:
            r, p = np.concatenate(rewards), np.concatenate(logps)
            out.update({"reward_accuracy": float(np.mean(r[g] > r[b])), "logp_accuracy": float(np.mean(p[g] > p[b])),
                        "pairs": int(g.size)})
        return out


@dataclasses.dataclass
class EarlyStopping:
    """Best held-out value so far; stop after ``patience`` evaluations without a strict
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


__all__ = ["EarlyStopping", "KTOEvaluator", "PreferenceEvaluator", "SFTEvaluator"]
