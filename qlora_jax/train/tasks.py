"""What the one trainer (``train/trainer.py``) drives: an objective with its batch source and its
held-out evaluation: SFT, the preference pairs (DPO with its reference; ORPO and CPO/SimPO
without one), KTO on unpaired rows, GRPO.

A task owns

* ``objective``: the loss the jit'd step differentiates (``qlora_jax/objectives/``);
* a batch source: ``next_batch(step, lora, ref_lora)`` -> :class:`StepBatch` (SFT and the pair
  objectives read a resumable iterator over tokenized data and may be fetched one step ahead; GRPO samples
  rollouts from the current adapters, so it is fetched when its step comes);
* ``evaluate(lora, ref_lora, step)`` on held-out data, what the run reports about it, and which
  evaluation's adapters are the best (``after_first_eval``, ``after_eval``);
* its part of a checkpoint's ``meta`` (data position, early-stopping state) and of the summary.

Everything else -- model loading, optimizer, resume, the loop, the non-finite guard,
checkpoints, metrics, export -- is the trainer's, written once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import data as data_lib
from qlora_jax.checkpoints.run_dir import read_metrics
from qlora_jax.data.batching import round_up
from qlora_jax.data.preference import PreferenceBatchIterator, prepare_preference
from qlora_jax.data.unpaired import UnpairedBatchIterator, prepare_unpaired
from qlora_jax.inference.generate import SamplingParams
from qlora_jax.objectives import grpo as grpo_lib
from qlora_jax.objectives import rewards as rewards_lib
from qlora_jax.objectives.dpo import DPOObjective, step_metrics
from qlora_jax.objectives.grpo import GRPOObjective
from qlora_jax.objectives.kto import KTOObjective
from qlora_jax.objectives.preference import CPOObjective, ORPOObjective
from qlora_jax.objectives.sft import SFT
from qlora_jax.train import loop
from qlora_jax.train import rollout as rollout_lib
from qlora_jax.train.config import ConfigError, RunConfig
from qlora_jax.train.evaluation import (
    EarlyStopping,
    KTOEvaluator,
    PreferenceEvaluator,
    ReferenceFreeEvaluator,
    SFTEvaluator,
)
from qlora_jax.train.metrics import plot_series

log = logging.getLogger("qlora_jax.train")


@dataclasses.dataclass
class StepBatch:
    arrays: dict[str, np.ndarray]  # [grad_accum, rows, ...] host arrays for the step
    meta: dict[str, Any]  # what a checkpoint after this step records of the data position
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # for the step's metric row


def eval_row(ev: dict[str, Any]) -> dict[str, Any]:
    """What metrics.jsonl gets from an evaluation (``eval_`` + name)."""
    return {f"eval_{k}": v for k, v in ev.items() if k != "examples"}


class Task:
    """Defaults shared by the tasks; see the module docstring for the protocol."""

    name = "sft"
    prefetch = True  # the next batch does not depend on this step's adapters
    loss_label: str | None = None  # y-axis label of loss.png (None: the default)
    stopped = False  # early stopping asked the trainer to end the run
    objective: Any = SFT

    def bind(self, graphdef: Any, mesh: Any, rest: Any) -> None:
        """Compile what needs the split model (evaluators, the sampler)."""

    def restore(self, meta: dict[str, Any], step: int) -> None:
        raise NotImplementedError

    def checkpoint_meta(self) -> dict[str, Any]:
        return {}

    def step_row(self, m: dict[str, Any], batch: StepBatch, seconds: float) -> dict[str, Any]:
        return {}

    def after_eval(self, ev: dict[str, Any], step: int, save_best) -> None:
        """DPO keeps the adapters of its best evaluation and may stop early."""

    def after_first_eval(self, ev: dict[str, Any], save_best) -> None:
        """The evaluation before step 1 (a fresh run only)."""

    def finish(self, result: dict[str, Any], workdir: Path) -> None:
        """Add the task's figures and plots to the run's result."""

    def postfix(self, row: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{row['loss']:.4f}", "tok_s": f"{row.get('tokens_per_s', 0):.0f}"}


def _tokens_per_s_median(result: dict[str, Any], workdir: Path) -> None:
    tps = [r["tokens_per_s"] for r in read_metrics(workdir / "metrics.jsonl") if "tokens_per_s" in r][2:]
    result["tokens_per_s_median"] = float(np.median(tps)) if tps else None  # compile steps are not counted


def _done_line(r: dict[str, Any], how: str) -> str:
    return f"done: {r['final_step']}/{r['total_steps']} steps in {r['train_seconds']} s ({how})"


class SFTTask(Task):
    """Token NLL of completions over a resumable, length-grouped (or packed) batch iterator."""

    def __init__(self, rc: RunConfig, tokenizer: Any, pad_id: int):
        d = rc.data
        self.train_ex, stats = data_lib.prepare_sft(d.train, tokenizer, max_length=d.max_length, format=d.format,
                                                    train_on_prompt=d.train_on_prompt, overflow=d.overflow)
        self.eval_ex = []
        if d.eval:
            self.eval_ex = data_lib.prepare_sft(d.eval, tokenizer, max_length=d.max_length, format=d.format,
                                                overflow=d.overflow)[0][:d.max_eval_examples]
        self.it = data_lib.BatchIterator(
            self.train_ex, batch_size=rc.train.batch_size, seq_len=d.max_length, pack=d.pack,
            group_by_length=d.group_by_length, pad_to_multiple_of=d.pad_to_multiple_of, pad_id=pad_id, seed=rc.seed)
        self.rc, self.pad_id = rc, pad_id
        self.data_counts = {"train_examples": stats.kept, "truncated": stats.truncated,
                            "dropped": stats.dropped_too_long + stats.dropped_no_completion}
        self.evaluator = None

    @property
    def has_eval(self) -> bool:
        return bool(self.eval_ex)

    def total_steps(self) -> int:
        t = self.rc.train
        return t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.epochs * self.it.steps_per_epoch / t.grad_accum))

    def summary(self) -> dict[str, Any]:
        return {**self.data_counts, "eval_examples": len(self.eval_ex), "micro_batches_per_epoch": self.it.steps_per_epoch}

    def bind(self, graphdef, mesh, rest):
        self.rest = rest
        self.evaluator = SFTEvaluator(graphdef, mesh, self.eval_ex, batch_size=self.rc.train.batch_size,
                                      seq_len=self.rc.data.max_length, pad_id=self.pad_id)

    def restore(self, meta, step):
        self.it.restore(meta["data"])

    def next_batch(self, step, lora, ref_lora) -> StepBatch:
        host = loop.stack_microbatches([next(self.it) for _ in range(self.rc.train.grad_accum)], self.pad_id)
        return StepBatch(host, {"data": self.it.state()}, {"tokens": float((host["segment_ids"] > 0).sum())})

    def step_row(self, m, batch, seconds):
        return {"loss_tokens": float(m["tokens"]), "tokens_per_s": batch.info["tokens"] / max(seconds, 1e-9)}

    def evaluate(self, lora, ref_lora, step):
        t0 = time.perf_counter()
        ev = self.evaluator(lora, self.rest)
        if step == 0:
            log.info("eval before training: loss %.4f, exact match %.1f%% (%.0f s)", ev["loss"],
                     100 * ev["exact_match"], time.perf_counter() - t0)
        return ev

    def finish(self, result, workdir):
        _tokens_per_s_median(result, workdir)

    def end_lines(self, r):
        tps = r["tokens_per_s_median"]  # None for runs of <= 2 steps
        lines = [_done_line(r, f"median {tps:.0f} tokens/s" if tps else "too few steps for a tokens/s median")]
        if "eval_after" in r and r.get("eval_before"):
            b, a = r["eval_before"], r["eval_after"]
            lines.append(f"eval loss      {b['loss']:.4f} -> {a['loss']:.4f}")
            lines.append(f"exact match    {100 * b['exact_match']:.1f}% -> {100 * a['exact_match']:.1f}% "
                         f"of {a['examples']} held-out examples (greedy answer == reference)")
        return lines


class PairTask(SFTTask):
    """Preference pairs (chosen/rejected rows interleaved); held-out reward accuracy, best adapter,
    optional early stopping. ``batch_size`` counts pairs. Shared by DPO and the reference-free
    objectives (ORPO, CPO/SimPO); a subclass gives the objective and its evaluator."""

    loss_name = "DPO"  # in the end-of-run lines
    reward_what = "beta*logratio"  # what a reward is, in the end-of-run lines

    def __init__(self, rc: RunConfig, tokenizer: Any, pad_id: int):
        d = rc.data
        train, stats = prepare_preference(d.train, tokenizer, max_length=d.max_length, overflow=d.overflow,
                                          text_as_chat=d.text_as_chat)
        self.eval_ex = []
        if d.eval:
            self.eval_ex = prepare_preference(d.eval, tokenizer, max_length=d.max_length, overflow=d.overflow,
                                              text_as_chat=d.text_as_chat)[0][:d.max_eval_examples]
        log.info("preference data: %s", stats.summary())
        self.it = PreferenceBatchIterator(
            train, batch_size=rc.train.batch_size, seq_len=d.max_length, group_by_length=d.group_by_length,
            pad_to_multiple_of=d.pad_to_multiple_of, pad_id=pad_id, seed=rc.seed)
        self.rc, self.pad_id = rc, pad_id
        self.data_counts = {"train_examples": stats.kept, "truncated": stats.truncated,
                            "dropped": stats.dropped_too_long + stats.dropped_no_completion}
        self.objective = self.make_objective(rc)
        self.stopper = EarlyStopping(patience=rc.train.early_stopping_patience)

    evaluator_class: type  # the held-out evaluator of the subclass's objective

    def make_objective(self, rc: RunConfig) -> Any:
        raise NotImplementedError

    def bind(self, graphdef, mesh, rest):
        self.rest = rest
        self.evaluator = self.evaluator_class(graphdef, mesh, self.eval_ex, self.objective,
                                              batch_size=self.rc.train.batch_size, seq_len=self.rc.data.max_length,
                                              pad_id=self.pad_id, pad_to_multiple_of=self.rc.data.pad_to_multiple_of)

    def metrics(self, m: dict[str, Any]) -> dict[str, float]:
        """Per-pair means of summed statistics (a step's or an evaluation's)."""
        raise NotImplementedError

    @property
    def stopped(self) -> bool:
        return self.stopper.stopped

    def restore(self, meta, step):
        self.it.restore(meta["data"])
        self.stopper = EarlyStopping.from_state(meta.get("early_stopping"), self.stopper.patience)

    def checkpoint_meta(self):
        return {"early_stopping": self.stopper.state()}

    def step_row(self, m, batch, seconds):
        return {**super().step_row(m, batch, seconds), **self.metrics(m)}

    def evaluate(self, lora, ref_lora, step):
        t0 = time.perf_counter()
        ev = self.evaluator(lora, self.rest, ref_lora)
        if step == 0:
            log.info("eval before training: loss %.4f, reward accuracy %.1f%%, log-prob accuracy %.1f%% (%.0f s)",
                     ev["loss"], 100 * ev["reward_accuracy"], 100 * ev["logp_accuracy"], time.perf_counter() - t0)
        return ev

    def after_eval(self, ev, step, save_best):
        if self.stopper.update(step, ev["reward_accuracy"]):
            where = save_best({"step": step, **ev})
            log.info("step %d: new best held-out reward accuracy %.1f%% -> %s", step, 100 * ev["reward_accuracy"],
                     where)
        if self.stopper.stopped:
            log.info("early stopping at step %d: no better held-out reward accuracy in %d evaluations "
                     "(best %.1f%% at step %d)", step, self.stopper.patience, 100 * self.stopper.best,
                     self.stopper.best_step)

    def finish(self, result, workdir):
        _tokens_per_s_median(result, workdir)
        if self.stopper.best_step >= 0:
            result["best"] = {"step": self.stopper.best_step, "eval_reward_accuracy": self.stopper.best,
                              "adapter_dir": str(workdir / "best_adapter")}

    def end_lines(self, r):
        lines = super().end_lines({k: v for k, v in r.items() if k not in ("eval_before", "eval_after")})
        if r.get("early_stopped_at"):
            lines.append(f"early stopped  at step {r['early_stopped_at']} (no better held-out reward accuracy)")
        if "eval_after" in r and r.get("eval_before"):
            b, a = r["eval_before"], r["eval_after"]
            lines.append(f"{self.loss_name + ' eval loss':<14} {b['loss']:.4f} -> {a['loss']:.4f}")
            lines.append(f"reward acc.    {100 * b['reward_accuracy']:.1f}% -> {100 * a['reward_accuracy']:.1f}% "
                         f"of {a['examples']} held-out pairs ({self.reward_what} chosen > rejected)")
            lines.append(f"log-prob acc.  {100 * b['logp_accuracy']:.1f}% -> {100 * a['logp_accuracy']:.1f}% "
                         "(policy log p(chosen) > log p(rejected))")
            lines.append(f"reward margin  {b['reward_margin']:.3f} -> {a['reward_margin']:.3f}")
            if "nll_loss" in a:
                lines.append(f"chosen NLL     {b['nll_loss']:.4f} -> {a['nll_loss']:.4f} (per token)")
        return lines


class DPOTask(PairTask):
    """DPO: a reference policy (adapters off, or frozen starting adapters) beside the trained one."""

    evaluator_class = PreferenceEvaluator

    name = "dpo"
    loss_label = "DPO loss per pair"

    def make_objective(self, rc):
        o = rc.dpo
        frozen = o.reference == "init" or (o.reference == "auto" and bool(rc.model.init_from))
        return DPOObjective(beta=float(o.beta), loss_type=o.loss_type, label_smoothing=float(o.label_smoothing),
                            frozen_adapters=frozen)

    def metrics(self, m):
        return step_metrics(m)

    def summary(self):
        o = self.objective
        return {**super().summary(), "objective": "dpo",
                "dpo": {"beta": o.beta, "loss_type": o.loss_type, "label_smoothing": o.label_smoothing},
                "reference": "frozen starting adapters" if o.frozen_adapters else "adapters off"}



class ReferenceFreeTask(PairTask):
    """ORPO and CPO / SimPO (``objectives/preference.py``): no reference policy, one forward per step."""

    evaluator_class = ReferenceFreeEvaluator

    def make_objective(self, rc):
        self.name = rc.objective
        nll_on_prompt = bool(rc.data.train_on_prompt)
        if rc.objective == "orpo":
            self.loss_name, self.reward_what = "ORPO", "beta*avg log p"
            self.loss_label = "ORPO loss per pair (chosen NLL + odds-ratio term)"
            return ORPOObjective(beta=float(rc.orpo.beta), nll_on_prompt=nll_on_prompt)
        c = rc.cpo
        simpo = c.loss_type == "simpo" and not c.cpo_alpha
        self.loss_name = "SimPO" if simpo else "CPO"
        self.reward_what = "beta*" + ("avg log p" if c.loss_type in ("ipo", "simpo") else "log p")
        if c.alpha:
            self.reward_what += " (AlphaPO-shaped)"
        self.loss_label = f"{self.loss_name} loss per pair" + ("" if simpo else f" ({c.loss_type})")
        return CPOObjective(beta=float(c.beta), loss_type=c.loss_type, label_smoothing=float(c.label_smoothing),
                            simpo_gamma=float(c.simpo_gamma), cpo_alpha=float(c.cpo_alpha), alpha=float(c.alpha),
                            nll_on_prompt=nll_on_prompt)

    def metrics(self, m):
        return self.objective.step_metrics(m)

    def after_first_eval(self, ev, save_best):
        # Without a reference, the untrained model's rewards already rank pairs (SmolLM2 ranks 98% of
        # the demo pairs right): the best adapter must beat that, else it stays the starting one.
        # Not counted against the early-stopping patience.
        if self.stopper.best_step < 0 and np.isfinite(ev["reward_accuracy"]):
            self.stopper.best, self.stopper.best_step = float(ev["reward_accuracy"]), 0
            save_best({"step": 0, **ev})

    def summary(self):
        section = {f.name: getattr(self.objective, f.name) for f in dataclasses.fields(self.objective)}
        return {**super().summary(), "objective": self.name, self.name: section, "reference": "none"}


class KTOTask(PairTask):
    """KTO (``objectives/kto.py``): labelled (prompt, completion) rows, each micro-batch with its
    mismatched KL rows; DPO's reference policy. ``batch_size`` counts rows. Early stopping and the
    best adapter follow the held-out reward accuracy of same-prompt (desirable, undesirable)
    combinations when the eval set has some, else the label accuracy."""

    name = "kto"
    loss_name = "KTO"
    evaluator_class = KTOEvaluator

    def __init__(self, rc: RunConfig, tokenizer: Any, pad_id: int):
        d = rc.data
        kw = dict(max_length=d.max_length, overflow=d.overflow, text_as_chat=d.text_as_chat)
        train, stats = prepare_unpaired(d.train, tokenizer, **kw)
        self.eval_ex = prepare_unpaired(d.eval, tokenizer, **kw)[0][:d.max_eval_examples] if d.eval else []
        log.info("KTO data: %s", stats.summary())
        self.it = UnpairedBatchIterator(
            train, batch_size=rc.train.batch_size, seq_len=d.max_length, group_by_length=d.group_by_length,
            pad_to_multiple_of=d.pad_to_multiple_of, pad_id=pad_id, seed=rc.seed)
        self.rc, self.pad_id = rc, pad_id
        self.data_counts = {"train_examples": stats.kept, "desirable": stats.desirable,
                            "undesirable": stats.undesirable, "truncated": stats.truncated,
                            "dropped": stats.dropped_too_long + stats.dropped_no_completion}
        self.objective = self.make_objective(rc)
        self.loss_label = f"KTO loss per row ({rc.kto.loss_type})"
        self.stopper = EarlyStopping(patience=rc.train.early_stopping_patience)

    def make_objective(self, rc):
        k = rc.kto
        frozen = k.reference == "init" or (k.reference == "auto" and bool(rc.model.init_from))
        return KTOObjective(beta=float(k.beta), loss_type=k.loss_type, desirable_weight=float(k.desirable_weight),
                            undesirable_weight=float(k.undesirable_weight), frozen_adapters=frozen)

    def metrics(self, m):
        return self.objective.step_metrics(m)

    @staticmethod
    def score(ev: dict[str, Any]) -> tuple[str, float]:
        """The held-out figure early stopping and the best adapter follow."""
        key = "reward_accuracy" if "reward_accuracy" in ev else "label_accuracy"
        return key, ev[key]

    def summary(self):
        o = self.objective
        return {**super().summary(), "objective": "kto",
                "kto": {"beta": o.beta, "loss_type": o.loss_type, "desirable_weight": o.desirable_weight,
                        "undesirable_weight": o.undesirable_weight},
                "reference": "frozen starting adapters" if o.frozen_adapters else "adapters off"}

    def evaluate(self, lora, ref_lora, step):
        t0 = time.perf_counter()
        ev = self.evaluator(lora, self.rest, ref_lora)
        if step == 0:
            log.info("eval before training: loss %.4f, label accuracy %.1f%%%s (%.0f s)", ev["loss"],
                     100 * ev["label_accuracy"], f", log-prob accuracy {100 * ev['logp_accuracy']:.1f}% of "
                     f"{ev['pairs']} same-prompt pairs" if "pairs" in ev else "", time.perf_counter() - t0)
        return ev

    def after_eval(self, ev, step, save_best):
        key, value = self.score(ev)
        what = key.replace("_", " ")
        if self.stopper.update(step, value):
            where = save_best({"step": step, **ev})
            log.info("step %d: new best held-out %s %.1f%% -> %s", step, what, 100 * value, where)
        if self.stopper.stopped:
            log.info("early stopping at step %d: no better held-out %s in %d evaluations (best %.1f%% at step %d)",
                     step, what, self.stopper.patience, 100 * self.stopper.best, self.stopper.best_step)

    def end_lines(self, r):
        lines = SFTTask.end_lines(self, {k: v for k, v in r.items() if k not in ("eval_before", "eval_after")})
        if r.get("early_stopped_at"):
            lines.append(f"early stopped  at step {r['early_stopped_at']} (no better held-out accuracy)")
        if "eval_after" in r and r.get("eval_before"):
            b, a = r["eval_before"], r["eval_after"]
            lines.append(f"KTO eval loss  {b['loss']:.4f} -> {a['loss']:.4f}")
            lines.append(f"label acc.     {100 * b['label_accuracy']:.1f}% -> {100 * a['label_accuracy']:.1f}% "
                         f"of {a['examples']} held-out rows (reward > 0 desirable, < 0 undesirable)")
            if "pairs" in a:
                lines.append(f"reward acc.    {100 * b['reward_accuracy']:.1f}% -> {100 * a['reward_accuracy']:.1f}% "
                             f"of {a['pairs']} same-prompt (desirable, undesirable) pairs")
                lines.append(f"log-prob acc.  {100 * b['logp_accuracy']:.1f}% -> {100 * a['logp_accuracy']:.1f}% "
                             "(policy log p(desirable) > log p(undesirable))")
            if "reward_margin" in a:
                lines.append(f"reward margin  {b['reward_margin']:.3f} -> {a['reward_margin']:.3f} "
                             "(mean desirable - mean undesirable reward)")
            if "kl" in a:
                lines.append(f"KL estimate    {b['kl']:.4f} -> {a['kl']:.4f}")
        return lines


class GRPOTask(Task):
    """Rollouts of the current policy scored by reward functions (``train/rollout.py``); held-out
    prompts answered (greedy by default) and scored before, during and after training."""

    name = "grpo"
    prefetch = False  # a rollout samples from the adapters of the step before

    def __init__(self, rc: RunConfig, tokenizer: Any, pad_id: int):
        g, d = rc.grpo, rc.data
        self.rc, self.g, self.pad_id, self.tokenizer = rc, g, pad_id, tokenizer
        self.reward_fns = [(name, rewards_lib.resolve_reward(name)) for name in g.reward_names]
        self.names = list(g.reward_names)
        self.weights = np.asarray(g.weights, np.float32)
        kw = dict(prompt_column=d.prompt_column, system_prompt=d.system_prompt, max_prompt_length=g.max_prompt_length)
        self.train_prompts, self.truncated_prompts = rollout_lib.load_prompts(d.train, tokenizer, **kw)
        self.eval_prompts = rollout_lib.load_prompts(d.eval, tokenizer, **kw)[0][:d.max_eval_examples] if d.eval else []
        if "exact_match" in self.names and "answer" not in self.train_prompts[0].columns:
            raise ConfigError(f"config.grpo.reward_funcs: 'exact_match' needs an 'answer' column in {d.train}")
        # One prompt width for the whole run (the longest prompt, rounded up): the step compiles once.
        self.prompt_width = round_up(max(len(p.prompt_ids) for p in self.train_prompts), d.pad_to_multiple_of)
        self.rows_per_step = rc.train.batch_size * rc.train.grad_accum
        self.it = rollout_lib.PromptIterator(len(self.train_prompts), self.rows_per_step // g.num_generations,
                                             rc.seed, self.train_prompts)
        self.frozen_ref = g.reference == "init" or (g.reference == "auto" and bool(rc.model.init_from))
        self.objective = GRPOObjective(loss_type=g.loss_type, beta=float(g.beta), epsilon=float(g.epsilon),
                                       epsilon_high=float(g.clip_high), max_completion_length=g.max_completion_length,
                                       temperature=float(g.temperature), use_old_logps=g.num_iterations > 1)
        self.loss_label = f"GRPO loss ({g.loss_type})"
        self.rollout: rollout_lib.Rollout | None = None
        self.rollout_data: dict[str, Any] | None = None
        self.rollout_seconds = 0.0

    @property
    def has_eval(self) -> bool:
        return bool(self.eval_prompts)

    def total_steps(self) -> int:
        return self.rc.train.max_steps

    def summary(self):
        g = self.g
        return {"objective": "grpo", "train_prompts": len(self.train_prompts),
                "truncated_prompts": self.truncated_prompts, "eval_prompts": len(self.eval_prompts),
                "prompts_per_step": self.rows_per_step // g.num_generations,
                "completions_per_step": self.rows_per_step,
                "grpo": {"num_generations": g.num_generations, "loss_type": g.loss_type, "beta": g.beta,
                         "epsilon": g.epsilon, "epsilon_high": g.clip_high, "scale_rewards": g.scale_rewards,
                         "num_iterations": g.num_iterations, "max_completion_length": g.max_completion_length,
                         "temperature": g.temperature, "reward_funcs": self.names,
                         "reward_weights": self.weights.tolist(), "dense_sampling": g.dense_sampling},
                "reference": "frozen starting adapters" if self.frozen_ref else "adapters off"}

    def bind(self, graphdef, mesh, rest):
        self.rest = rest
        self.sampler = rollout_lib.Sampler(graphdef, rest, self.tokenizer, dense=self.g.dense_sampling,
                                           dtype=jnp.dtype(self.rc.model.dtype))
        self.score = rollout_lib.score_fn(graphdef, mesh, float(self.g.temperature))

    def restore(self, meta, step):
        self.it.restore(meta["data"])
        if step % self.g.num_iterations:  # stopped inside a rollout's iterations (SIGTERM): sample it again
            self.it.restore(meta["rollout_data"])
            log.warning("resumed at step %d, inside a rollout's %d iterations: it is sampled again", step,
                        self.g.num_iterations)

    def next_batch(self, step, lora, ref_lora) -> StepBatch:
        mu = self.g.num_iterations
        if self.rollout is None or step % mu == 0:
            self.rollout_data = self.it.state()
            self.rollout = self._make_rollout(step - step % mu, lora, ref_lora)
            self.rollout_seconds += self.rollout.seconds
        return StepBatch(self.rollout.batch, {"data": self.it.state(), "rollout_data": self.rollout_data},
                         {"rollout": self.rollout})

    def _make_rollout(self, at_step: int, lora, ref_lora) -> rollout_lib.Rollout:
        g, rc = self.g, self.rc
        t0 = time.perf_counter()
        C = g.max_completion_length
        prompts = [self.train_prompts[i] for i in self.it.next_indices()]
        sampling = SamplingParams(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                                  seed=rollout_lib.rollout_seed(rc.seed, at_step))
        rows, tokens, _, truncated, rewards = rollout_lib.score_prompts(
            self.sampler, lora, prompts, self.reward_fns, self.weights, repeat=g.num_generations, max_new_tokens=C,
            sampling=sampling)
        total = grpo_lib.weighted_total(rewards, self.weights)
        adv = grpo_lib.group_advantages(total, g.num_generations, scale_rewards=g.scale_rewards)
        adv = grpo_lib.Advantages(*(np.asarray(a) for a in adv))
        keep = list(~truncated) if g.mask_truncated_completions else None
        flat = grpo_lib.build_batch([p.prompt_ids for p in rows], tokens, pad_id=self.pad_id,
                                    prompt_width=self.prompt_width, completion_width=C, keep=keep)
        flat["advantages"] = np.repeat(adv.advantages[:, None], C, axis=1).astype(np.float32)
        micro = rc.train.grad_accum
        batch = {k: v.reshape(micro, v.shape[0] // micro, *v.shape[1:]) for k, v in flat.items()}
        zeros = np.zeros_like(batch["advantages"])
        batch["old_logps"], batch["ref_logps"] = zeros, zeros
        if g.num_iterations > 1 or g.beta:
            old, ref = [], []
            for i in range(micro):
                mb = {k: batch[k][i] for k in ("input_ids", "positions", "segment_ids", "completion_ids")}
                if g.num_iterations > 1:
                    old.append(np.asarray(self.score(lora, self.rest, mb, True)))
                if g.beta:
                    ref.append(np.asarray(self.score(ref_lora, self.rest, mb, True) if self.frozen_ref
                                          else self.score(lora, self.rest, mb, False)))
            if old:
                batch["old_logps"] = np.stack(old)
            if ref:
                batch["ref_logps"] = np.stack(ref)
        return rollout_lib.Rollout(batch, rewards, total, adv, np.asarray([len(t) for t in tokens]), truncated,
                                   time.perf_counter() - t0)

    def step_row(self, m, batch, seconds):
        r = batch.info["rollout"]
        tokens = max(float(m["tokens"]), 1.0)
        return {**grpo_lib.reward_metrics(r.rewards, r.total, self.names),
                "frac_reward_zero_std": float(np.mean(r.advantages.zero_std)),
                "completion_length": float(np.mean(r.lengths)), "truncated": float(np.mean(r.truncated)),
                "completion_tokens": float(m["tokens"]), "kl": float(m["kl"]) / tokens,
                "clip_ratio/low": float(m["clip_low"]) / tokens, "clip_ratio/high": float(m["clip_high"]) / tokens,
                "clip_ratio/region": (float(m["clip_low"]) + float(m["clip_high"])) / tokens,
                "ratio": float(m["ratio"]) / tokens, "rollout_seconds": r.seconds, "step_seconds": seconds}

    def postfix(self, row):
        return {"reward": f"{row['reward']:.3f}", "loss": f"{row['loss']:.4f}"}

    def evaluate(self, lora, ref_lora, step):
        g = self.g
        sampling = SamplingParams(temperature=g.eval_temperature, seed=self.rc.seed)
        t0 = time.perf_counter()
        rows, tokens, texts, truncated, rewards = rollout_lib.score_prompts(
            self.sampler, lora, self.eval_prompts, self.reward_fns, self.weights, repeat=1,
            max_new_tokens=g.max_completion_length, sampling=sampling, batch_rows=self.rc.train.batch_size)
        total = grpo_lib.weighted_total(rewards, self.weights)
        if jax.process_index() == 0:
            out = self.rc.workdir / "eval_completions"
            out.mkdir(exist_ok=True)
            with (out / f"step_{step:05d}.jsonl").open("w") as f:
                for p, text, r in zip(rows, texts, rewards):
                    f.write(json.dumps({"prompt": p.prompt, **dict(p.columns), "completion": text,
                                        **dict(zip(self.names, map(float, r)))}) + "\n")
        ev = {**grpo_lib.reward_metrics(rewards, total, self.names),
              "completion_length": float(np.mean([len(t) for t in tokens])), "truncated": float(np.mean(truncated)),
              "examples": len(rows)}
        log.info("eval at step %d: reward %.3f (%s) in %.0f s", step, ev["reward"],
                 ", ".join(f"{n} {ev[f'rewards/{n}']:.3f}" for n in self.names), time.perf_counter() - t0)
        return ev

    def finish(self, result, workdir):
        result["rollout_seconds"] = round(self.rollout_seconds, 1)
        rows = [r for r in read_metrics(workdir / "metrics.jsonl") if "reward" in r]
        if rows:
            k = max(1, min(4, len(rows) // 4))
            result["train_reward_first"] = float(np.mean([r["reward"] for r in rows[:k]]))
            result["train_reward_last"] = float(np.mean([r["reward"] for r in rows[-k:]]))
            result["train_reward_window"] = k
        plot = plot_rewards(workdir, self.names)
        result["reward_plot"] = str(plot) if plot else None

    def end_lines(self, r):
        lines = [_done_line(r, f"{r['rollout_seconds']} s sampling and scoring")]
        if "train_reward_first" in r:
            lines.append(f"train reward   {r['train_reward_first']:.3f} -> {r['train_reward_last']:.3f} "
                         f"(mean of the first / last {r['train_reward_window']} steps' rollouts)")
        if r.get("eval_before") and r.get("eval_after"):
            b, a = r["eval_before"], r["eval_after"]
            lines.append(f"eval reward    {b['reward']:.3f} -> {a['reward']:.3f} on {a['examples']} held-out prompts")
            for n in self.names:
                lines.append(f"  {n:<12} {b[f'rewards/{n}']:.3f} -> {a[f'rewards/{n}']:.3f}")
        return lines


def plot_rewards(workdir: Path, names: list[str]) -> Path | None:
    """Mean reward per step (train rollouts) and on the held-out prompts, from metrics.jsonl."""
    rows = read_metrics(workdir / "metrics.jsonl")
    series = [("train rollouts (mean)", [(r["step"], r["reward"]) for r in rows if "reward" in r], "-"),
              ("held-out prompts", [(r["step"], r["eval_reward"]) for r in rows if "eval_reward" in r], "o-")]
    series += [(f"held-out: {name}", [(r["step"], r[f"eval_rewards/{name}"]) for r in rows
                                      if f"eval_rewards/{name}" in r], "s--") for name in names]
    return plot_series(workdir / "reward.png", series, ylabel="reward (sum over reward functions)")


def make_task(rc: RunConfig, tokenizer: Any, pad_id: int) -> Task:
    tasks = {"sft": SFTTask, "dpo": DPOTask, "orpo": ReferenceFreeTask, "cpo": ReferenceFreeTask, "kto": KTOTask,
             "grpo": GRPOTask}
    return tasks[rc.objective](rc, tokenizer, pad_id)


__all__ = ["DPOTask", "GRPOTask", "KTOTask", "PairTask", "ReferenceFreeTask", "SFTTask", "StepBatch", "Task", "eval_row", "make_task", "plot_rewards"]
