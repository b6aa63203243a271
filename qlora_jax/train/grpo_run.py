"""GRPO in the trainer: prompts -> sampled groups -> rewards -> advantages -> clipped policy-gradient step.

``run(cfg)`` (``train/run.py``) hands ``objective="grpo"`` configs to :func:`run_grpo`. One optimizer
step (trl 1.16.0's semantics, ``qlora_jax/grpo.py``):

1. **Rollout.** ``batch_size * grad_accum / num_generations`` prompts, each repeated G times, are
   completed by the current policy with the jit-compiled KV-cache sampler (``qlora_jax.generate``).
   With ``grpo.dense_sampling`` the sampler reads a dequantized copy of the frozen NF4 base made once
   at start (the same weights; it skips re-dequantizing every weight at every decoded token). The
   completion mask runs up to and including the stop token.
2. **Rewards.** The reward functions (``qlora_jax/rewards.py``) score the decoded completions; their
   weighted sum is normalized within each prompt's group into advantages.
3. **Update.** The step of ``loop.make_step_fns`` (gradient accumulation, clipping, AdamW, shardings,
   non-finite guard) with :class:`GRPOObjective`. Reference log-probs (adapters off, or frozen
   starting adapters) and, when ``num_iterations > 1``, the old policy's log-probs are computed once
   per rollout, outside the differentiated function; with ``num_iterations == 1`` the old policy is
   the current one (ratio 1), as in trl.

The rollout's draws come from ``(seed, step)`` and the prompt order from ``(seed, epoch)``, so a run
killed and resumed from a checkpoint logs the same metrics as one that was not. Checkpoints, metrics
(``metrics.jsonl``, TensorBoard, ``loss.png``, ``reward.png``) and PEFT export are the SFT trainer's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from qlora_jax import grpo as grpo_lib
from qlora_jax import rewards as rewards_lib
from qlora_jax.checkpoints.load import load_model
from qlora_jax.data import DataError, load_rows
from qlora_jax.data.batching import round_up
from qlora_jax.data.tokenize import encode, render_chat
from qlora_jax.generate import Generator, SamplingParams
from qlora_jax.quant import dequantize_4bit
from qlora_jax.quant.nf4 import Quant4bit
from qlora_jax.train import checkpoint as ckpt_lib
from qlora_jax.train import loop
from qlora_jax.train import run as run_lib
from qlora_jax.train import sharding as shard_lib
from qlora_jax.train.config_check import ConfigError, check_inputs, validate_config
from qlora_jax.train.metrics import MetricsWriter, plot_loss, read_metrics
from qlora_jax.train.optim import make_optimizer, warmup_steps

log = logging.getLogger("qlora_jax.train")

# -- config ------------------------------------------------------------------------------------------

CHOICES = {"grpo.loss_type": grpo_lib.LOSS_TYPES, "grpo.scale_rewards": grpo_lib.SCALE_REWARDS,
           "grpo.reference": ("auto", "base", "init")}


def reward_functions(cfg: ConfigDict) -> tuple[list[tuple[str, Any]], np.ndarray]:
    """``[(name, fn)]`` and float32 weights from ``grpo.reward_funcs`` / ``grpo.reward_weights``."""
    try:
        names = rewards_lib.parse_reward_specs(cfg.grpo.reward_funcs)
        fns = [(name, rewards_lib.resolve_reward(name)) for name in names]
    except rewards_lib.RewardError as err:
        raise ConfigError(f"config.grpo.reward_funcs={cfg.grpo.reward_funcs!r}: {err}") from err
    raw = [w.strip() for w in str(cfg.grpo.reward_weights).split(",") if w.strip()]
    if not raw:
        return fns, np.ones(len(fns), np.float32)
    try:
        weights = np.asarray([float(w) for w in raw], np.float32)
    except ValueError as err:
        raise ConfigError(f"config.grpo.reward_weights={cfg.grpo.reward_weights!r}: not numbers") from err
    if len(weights) != len(fns):
        raise ConfigError(f"config.grpo.reward_weights={cfg.grpo.reward_weights!r}: {len(weights)} weights for "
                          f"{len(fns)} reward functions ({cfg.grpo.reward_funcs})")
    return fns, weights


def validate_grpo_config(cfg: ConfigDict) -> None:
    """The shared checks of ``config_check`` plus GRPO's own; every message names its key."""
    errors: list[str] = []
    shared = ConfigDict(cfg.to_dict())
    shared.objective = "sft"  # the shared keys (model, lora, optim, train, data.train) are checked as for SFT
    try:
        validate_config(shared)
    except ConfigError as err:
        errors += [line.strip() for line in str(err).splitlines()[1:]]
    if "grpo" not in cfg:
        raise ConfigError("invalid config:\n  config.objective='grpo' needs a config.grpo section (see configs/grpo.py)")
    g = cfg.grpo
    for key, allowed in CHOICES.items():
        value = g[key.split(".")[1]]
        if value not in allowed:
            errors.append(f"config.{key}={value!r}: must be one of {', '.join(map(repr, allowed))}")
    if not g.num_generations >= 2:
        errors.append(f"config.grpo.num_generations={g.num_generations!r}: must be >= 2 (the group mean is the "
                      "baseline of each completion)")
    rows = cfg.train.batch_size * cfg.train.grad_accum
    if g.num_generations >= 2 and rows % g.num_generations:
        errors.append(f"config.train.batch_size x config.train.grad_accum = {rows} completions per step must be a "
                      f"multiple of config.grpo.num_generations={g.num_generations}")
    for key, ok, need in [("beta", g.beta >= 0, ">= 0"), ("epsilon", 0 <= g.epsilon < 1, "in [0, 1)"),
                          ("epsilon_high", g.epsilon_high == -1 or g.epsilon_high >= 0, ">= 0 (or -1: = epsilon)"),
                          ("num_iterations", g.num_iterations >= 1, ">= 1"),
                          ("max_prompt_length", g.max_prompt_length > 0, "> 0"),
                          ("max_completion_length", g.max_completion_length > 0, "> 0"),
                          ("temperature", g.temperature > 0, "> 0"), ("top_k", g.top_k >= 0, ">= 0"),
                          ("top_p", 0 < g.top_p <= 1, "in (0, 1]"), ("eval_temperature", g.eval_temperature >= 0, ">= 0")]:
        if not ok:
            errors.append(f"config.grpo.{key}={g[key]!r}: must be {need}")
    if not cfg.train.max_steps > 0:
        errors.append(f"config.train.max_steps={cfg.train.max_steps!r}: GRPO needs a number of optimizer steps > 0")
    if g.num_iterations >= 1 and cfg.train.checkpoint_every % g.num_iterations:
        errors.append(f"config.train.checkpoint_every={cfg.train.checkpoint_every}: must be a multiple of "
                      f"config.grpo.num_iterations={g.num_iterations} (a checkpoint falls between rollouts)")
    if g.reference == "init" and not cfg.model.init_from:
        errors.append("config.grpo.reference='init' needs config.model.init_from (the adapters to freeze)")
    try:
        reward_functions(cfg)
    except ConfigError as err:
        errors.append(str(err))
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


# -- prompts -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class PromptExample:
    prompt: Any  # as in the dataset: a string or a message list (what reward functions receive)
    prompt_ids: list[int]  # rendered through the chat template, generation header included
    columns: dict[str, Any]  # every other column of the row (e.g. "answer")


def load_prompts(source: str, tokenizer: Any, *, prompt_column: str, system_prompt: str,
                 max_prompt_length: int) -> tuple[list[PromptExample], int]:
    """(prompts, number whose start was cut off to fit ``max_prompt_length``)."""
    rows = load_rows(source)
    if prompt_column not in rows.column_names:
        raise DataError(f"{source}: no {prompt_column!r} column (config.data.prompt_column); columns are "
                        f"{rows.column_names}")
    out, truncated = [], 0
    for i, row in enumerate(rows):
        prompt = row[prompt_column]
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
            messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
        else:
            raise DataError(f"{source} row {i}: {prompt_column!r} must be a string or a message list")
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages
        ids = encode(tokenizer, render_chat(tokenizer, messages, add_generation_prompt=True))
        if len(ids) > max_prompt_length:
            ids, truncated = ids[-max_prompt_length:], truncated + 1
        out.append(PromptExample(prompt, ids, {k: v for k, v in row.items() if k != prompt_column}))
    return out, truncated


class PromptIterator:
    """Prompt indices ``per_step`` at a time, reshuffled every epoch from ``(seed, epoch)``; resumable."""

    def __init__(self, n: int, per_step: int, seed: int):
        self.n, self.per_step, self.seed = n, per_step, seed
        self.epoch = self.position = 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next_indices(self) -> list[int]:
        out = []
        while len(out) < self.per_step:
            take = self._order()[self.position:self.position + self.per_step - len(out)]
            out += [int(i) for i in take]
            self.position += len(take)
            if self.position >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# -- the objective -------------------------------------------------------------------------------------


def policy_logps(graphdef, lora, rest, batch, *, lora_enabled: bool = True, key=None, deterministic: bool = True,
                 temperature: float = 1.0) -> jax.Array:
    """Per-token log-probs ``[rows, C]`` of ``batch["completion_ids"]``: rows are the left-padded prompt
    (width P) then the completion, so the hidden states at P-1 .. P+C-2 predict the C completion tokens."""
    model = nnx.merge(graphdef, lora, rest)
    h = model.hidden_states(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                            lora_enabled=lora_enabled, deterministic=deterministic, rngs=key)
    c = batch["completion_ids"].shape[-1]
    p = batch["input_ids"].shape[-1] - c
    return grpo_lib.completion_logps(h[:, p - 1:p - 1 + c], model.lm_head_weight(), batch["completion_ids"],
                                     temperature=temperature)


@dataclasses.dataclass(frozen=True)
class GRPOObjective:
    """The GRPO objective for ``loop.make_step_fns`` (the reference is precomputed into the batch)."""

    loss_type: str
    beta: float
    epsilon: float
    epsilon_high: float
    max_completion_length: int
    temperature: float = 1.0
    use_old_logps: bool = False  # num_iterations > 1: ratio against the rollout policy's log-probs

    stat_keys = ("sequences", "tokens", "micro_batches", "kl", "clip_low", "clip_high", "ratio")
    frozen_adapters = False

    @property
    def weight_key(self) -> str:
        return grpo_lib.WEIGHT_KEYS[self.loss_type]

    def reference(self, graphdef, lora, rest, batch, ref_lora):
        return None

    def loss_sums(self, graphdef, lora, rest, batch, key, reference):
        logps = policy_logps(graphdef, lora, rest, batch, key=key, deterministic=False, temperature=self.temperature)
        old = batch["old_logps"] if self.use_old_logps else jax.lax.stop_gradient(logps)
        tl = grpo_lib.per_token_loss(logps, old, batch["advantages"], epsilon=self.epsilon,
                                     epsilon_high=self.epsilon_high, beta=self.beta,
                                     ref_logps=batch["ref_logps"] if self.beta else None)
        mask = batch["completion_mask"]
        num, weights = grpo_lib.loss_sums(tl.loss, mask, loss_type=self.loss_type,
                                          max_completion_length=self.max_completion_length)
        f32 = jnp.float32
        stats = {**weights, "kl": jnp.sum(tl.kl * mask), "clip_low": jnp.sum(tl.clipped_low.astype(f32) * mask),
                 "clip_high": jnp.sum(tl.clipped_high.astype(f32) * mask), "ratio": jnp.sum(tl.ratio * mask)}
        return num, stats


def _score_fn(graphdef, mesh, temperature: float):
    repl = shard_lib.replicated(mesh)

    def fn(lora, rest, batch, lora_enabled):
        return policy_logps(graphdef, lora, rest, batch, lora_enabled=lora_enabled, temperature=temperature)

    return jax.jit(fn, static_argnums=(3,), out_shardings=repl)


# -- rollouts ------------------------------------------------------------------------------------------


def dense_state(rest: Any, dtype: Any) -> Any:
    """The frozen state with every 4-bit weight dequantized (stacked layers stay stacked)."""
    def deq(x):
        if not isinstance(x, Quant4bit):
            return x
        fn = lambda q: dequantize_4bit(q, dtype)  # noqa: E731
        for _ in range(jnp.ndim(x.offset)):  # one vmap per leading (layer) axis
            fn = jax.vmap(fn)
        return fn(x)

    return jax.jit(lambda r: jax.tree.map(deq, r, is_leaf=lambda x: isinstance(x, Quant4bit)))(rest)


class Sampler:
    """The policy's sampler: ``Generator`` on the current adapters and the (optionally dense) frozen base."""

    def __init__(self, graphdef, rest, tokenizer, *, dense: bool, dtype: Any):
        self.graphdef, self.tokenizer = graphdef, tokenizer
        self.rest = dense_state(rest, dtype) if dense else rest

    def generate(self, lora, prompt_ids: list[list[int]], *, max_new_tokens: int, sampling: SamplingParams,
                 batch_rows: int = 0):
        gen = Generator(nnx.merge(self.graphdef, lora, self.rest), self.tokenizer)
        step = batch_rows or len(prompt_ids)
        parts = [gen.generate(prompt_ids[i:i + step], max_new_tokens=max_new_tokens, sampling=sampling)
                 for i in range(0, len(prompt_ids), step)]
        return ([t for p in parts for t in p.tokens], [t for p in parts for t in p.texts],
                [r == "length" for p in parts for r in p.finish_reasons])


@dataclasses.dataclass
class Rollout:
    batch: dict[str, np.ndarray]  # [micro, rows / micro, ...] for the train step
    rewards: np.ndarray  # [rows, functions] (NaN: not scored)
    total: np.ndarray  # [rows] weighted sum
    advantages: grpo_lib.Advantages
    lengths: np.ndarray  # [rows] completion tokens
    truncated: np.ndarray  # [rows] bool: no stop token within max_completion_length
    seconds: float


def rollout_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0] >> 1)


def score_prompts(sampler: Sampler, lora, prompts: list[PromptExample], reward_fns, weights, *, repeat: int,
                  max_new_tokens: int, sampling: SamplingParams, batch_rows: int = 0):
    """Generate ``repeat`` completions per prompt (rows of a prompt adjacent) and score them."""
    rows = [p for p in prompts for _ in range(repeat)]
    tokens, texts, truncated = sampler.generate(lora, [p.prompt_ids for p in rows], max_new_tokens=max_new_tokens,
                                                sampling=sampling, batch_rows=batch_rows)
    columns = {k: [p.columns.get(k) for p in rows] for k in rows[0].columns}
    columns["completion_ids"] = tokens
    rewards = rewards_lib.compute_rewards(reward_fns, [p.prompt for p in rows], texts, columns)
    return rows, tokens, texts, np.asarray(truncated), rewards


# -- metrics -------------------------------------------------------------------------------------------


def reward_metrics(rewards: np.ndarray, total: np.ndarray, names: list[str], prefix: str = "") -> dict[str, float]:
    out = {f"{prefix}reward": float(np.nanmean(total)) if np.isfinite(total).any() else float("nan"),
           f"{prefix}reward_std": float(np.nanstd(total, ddof=1)) if np.isfinite(total).sum() > 1 else 0.0}
    for j, name in enumerate(names):
        col = rewards[:, j]
        out[f"{prefix}rewards/{name}"] = float(np.nanmean(col)) if np.isfinite(col).any() else float("nan")
    return out


def plot_rewards(workdir: Path, names: list[str]) -> Path | None:
    """Mean reward per step (train rollouts) and on the held-out prompts, from metrics.jsonl."""
    rows = read_metrics(workdir / "metrics.jsonl")
    train = [(r["step"], r["reward"]) for r in rows if "reward" in r]
    evals = [(r["step"], r["eval_reward"]) for r in rows if "eval_reward" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train rollouts (mean)", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out prompts", lw=1.5)
        for name in names:
            pts = [(r["step"], r[f"eval_rewards/{name}"]) for r in rows if f"eval_rewards/{name}" in r]
            ax.plot(*zip(*pts), "s--", label=f"held-out: {name}", lw=1.0, ms=4, alpha=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward (sum over reward functions)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = workdir / "reward.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# -- the run -------------------------------------------------------------------------------------------


def run_grpo(cfg: ConfigDict) -> dict[str, Any]:
    validate_grpo_config(cfg)
    done = run_lib.already_finished(cfg)  # run twice: say so, change nothing
    if done is not None:
        return done
    check_inputs(cfg)  # data files, init_from, a writable workdir: before the model is loaded
    g = cfg.grpo
    reward_fns, weights = reward_functions(cfg)
    names = [name for name, _ in reward_fns]
    workdir = Path(cfg.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    run_lib._setup_logging(workdir)
    t_start = time.perf_counter()

    mesh = shard_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    lora = run_lib.lora_config_from(cfg)
    quantize = None if cfg.model.quantize in ("none", "") else cfg.model.quantize
    log.info("loading %s (quantize=%s, compute %s)", cfg.model.source, quantize, cfg.model.dtype)
    model, tokenizer = load_model(
        cfg.model.source, quantize=quantize, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
        lora=lora, mesh=mesh, shardings=run_lib.sharding_fn(mesh), blocksize=cfg.model.blocksize,
        double_quant=cfg.model.double_quant, remat=cfg.model.remat, rng_seed=cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ---- prompts ----------------------------------------------------------------------------------
    kw = dict(prompt_column=cfg.data.prompt_column, system_prompt=cfg.data.system_prompt,
              max_prompt_length=g.max_prompt_length)
    train_prompts, truncated_prompts = load_prompts(cfg.data.train, tokenizer, **kw)
    eval_prompts = load_prompts(cfg.data.eval, tokenizer, **kw)[0][:cfg.data.max_eval_examples] if cfg.data.eval else []
    if "exact_match" in names and "answer" not in train_prompts[0].columns:
        raise ConfigError(f"config.grpo.reward_funcs: 'exact_match' needs an 'answer' column in {cfg.data.train}")
    G, mu, C = g.num_generations, g.num_iterations, g.max_completion_length
    # One prompt width for the whole run (the longest prompt, rounded up): the step compiles once.
    prompt_width = round_up(max(len(p.prompt_ids) for p in train_prompts), cfg.data.pad_to_multiple_of)
    rows_per_step = cfg.train.batch_size * cfg.train.grad_accum
    it = PromptIterator(len(train_prompts), rows_per_step // G, cfg.seed)
    total_steps = cfg.train.max_steps

    # ---- optimizer, step, sampler, checkpoints --------------------------------------------------------
    tx, schedule = make_optimizer(
        lr=cfg.optim.lr, total_steps=total_steps, warmup_ratio=cfg.optim.warmup_ratio, schedule=cfg.optim.schedule,
        weight_decay=cfg.optim.weight_decay, max_grad_norm=cfg.optim.max_grad_norm, b1=cfg.optim.b1,
        b2=cfg.optim.b2, eps=cfg.optim.eps)
    eps_high = g.epsilon if g.epsilon_high == -1 else g.epsilon_high
    objective = GRPOObjective(loss_type=g.loss_type, beta=float(g.beta), epsilon=float(g.epsilon),
                              epsilon_high=float(eps_high), max_completion_length=C,
                              temperature=float(g.temperature), use_old_logps=mu > 1)
    fns, lora_state, rest, opt_state = loop.make_step_fns(model, tx, mesh, offload_optimizer=cfg.optim.offload,
                                                          objective=objective)
    del model
    sampler = Sampler(fns.graphdef, rest, tokenizer, dense=g.dense_sampling, dtype=jnp.dtype(cfg.model.dtype))
    score = _score_fn(fns.graphdef, mesh, float(g.temperature))
    frozen_ref = g.reference == "init" or (g.reference == "auto" and bool(cfg.model.init_from))
    ckpts = ckpt_lib.RunCheckpoints(workdir, keep=cfg.train.keep_checkpoints)
    record = run_lib.lora_record(lora, cfg)
    repl = shard_lib.replicated(mesh)
    base_key = np.asarray(jax.random.key_data(jax.random.key(cfg.seed)))
    ref_lora, start, rollout_data = None, 0, None
    latest = ckpts.latest_step()
    if latest is None:  # from step 0: an attempt killed before its first checkpoint left rows behind
        run_lib.drop_records_after(workdir, -1)
    if latest is not None:
        meta = ckpts.read_meta(latest)
        ckpt_lib.check_lora_record(meta.get("lora", {}), record, f"{ckpts.directory / str(latest)}")
        abstract_train = {"opt_state": ckpt_lib.abstract_like(opt_state),
                          "rng": jax.ShapeDtypeStruct(base_key.shape, base_key.dtype, sharding=repl)}
        if frozen_ref:
            abstract_train["ref_lora"] = ckpt_lib.abstract_like(lora_state)
        lora_state, train_state, meta = ckpts.restore(latest, ckpt_lib.abstract_like(lora_state), abstract_train)
        opt_state, base_key = train_state["opt_state"], np.asarray(train_state["rng"])
        ref_lora = train_state.get("ref_lora")
        start = int(meta["step"])
        it.restore(meta["data"])
        if start % mu:  # stopped between the iterations of one rollout (SIGTERM): redo it with these adapters
            it.restore(meta["rollout_data"])
            log.warning("resumed at step %d, inside a rollout's %d iterations: it is sampled again", start, mu)
        if start >= total_steps:  # finished (the config asks for no more steps)
            done = run_lib.finished_summary(workdir)
            if done is not None and done["final_step"] == start:
                ckpts.close()
                return run_lib.report_already_finished(workdir, done)
        run_lib.drop_records_after(workdir, start)
        log.info("resumed from %s at step %d", ckpts.directory / str(latest), start)
    elif cfg.model.init_from:
        lora_state, where = ckpt_lib.init_adapters_from(cfg.model.init_from, ckpt_lib.abstract_like(lora_state),
                                                        record)
        log.info("adapters initialised from %s", where)
    if frozen_ref and ref_lora is None:
        ref_lora = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=fns.lora_shardings)(lora_state)

    summary = {
        "objective": "grpo", "model": str(cfg.model.source), "quantize": quantize, "compute_dtype": cfg.model.dtype,
        "trainable_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lora_state)),
        "mesh": dict(mesh.shape), "devices": jax.device_count(), "processes": jax.process_count(),
        "train_prompts": len(train_prompts), "truncated_prompts": truncated_prompts, "eval_prompts": len(eval_prompts),
        "prompts_per_step": rows_per_step // G, "completions_per_step": rows_per_step, "grad_accum": cfg.train.grad_accum,
        "total_steps": total_steps, "warmup_steps": warmup_steps(total_steps, cfg.optim.warmup_ratio),
        "max_steps": cfg.train.max_steps,
        "grpo": {"num_generations": G, "loss_type": g.loss_type, "beta": g.beta, "epsilon": g.epsilon,
                 "epsilon_high": eps_high, "scale_rewards": g.scale_rewards, "num_iterations": mu,
                 "max_completion_length": C, "temperature": g.temperature, "reward_funcs": names,
                 "reward_weights": weights.tolist(), "dense_sampling": g.dense_sampling},
        "reference": "frozen starting adapters" if frozen_ref else "adapters off",
    }
    log.info("run: %s", json.dumps(summary))
    metrics = MetricsWriter(workdir)

    def run_eval(adapters, at_step: int) -> dict[str, float]:
        sampling = SamplingParams(temperature=g.eval_temperature, seed=cfg.seed)
        t0 = time.perf_counter()
        rows, tokens, texts, truncated, rewards = score_prompts(
            sampler, adapters, eval_prompts, reward_fns, weights, repeat=1, max_new_tokens=C, sampling=sampling,
            batch_rows=cfg.train.batch_size)
        total = grpo_lib.weighted_total(rewards, weights)
        if jax.process_index() == 0:
            out = workdir / "eval_completions"
            out.mkdir(exist_ok=True)
            with (out / f"step_{at_step:05d}.jsonl").open("w") as f:
                for p, text, r in zip(rows, texts, rewards):
                    f.write(json.dumps({"prompt": p.prompt, **{k: v for k, v in p.columns.items()},
                                        "completion": text, **dict(zip(names, map(float, r)))}) + "\n")
        ev = {**reward_metrics(rewards, total, names), "completion_length": float(np.mean([len(t) for t in tokens])),
              "truncated": float(np.mean(truncated)), "examples": len(rows)}
        log.info("eval at step %d: reward %.3f (%s) in %.0f s", at_step, ev["reward"],
                 ", ".join(f"{n} {ev[f'rewards/{n}']:.3f}" for n in names), time.perf_counter() - t0)
        return ev

    def eval_row(ev):
        return {f"eval_{k}": v for k, v in ev.items() if k != "examples"}

    def make_rollout(at_step: int) -> Rollout:
        t0 = time.perf_counter()
        prompts = [train_prompts[i] for i in it.next_indices()]
        sampling = SamplingParams(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                                  seed=rollout_seed(cfg.seed, at_step))
        rows, tokens, _, truncated, rewards = score_prompts(sampler, lora_state, prompts, reward_fns, weights,
                                                            repeat=G, max_new_tokens=C, sampling=sampling)
        total = grpo_lib.weighted_total(rewards, weights)
        adv = grpo_lib.group_advantages(total, G, scale_rewards=g.scale_rewards)
        adv = grpo_lib.Advantages(*(np.asarray(a) for a in adv))
        keep = list(~truncated) if g.mask_truncated_completions else None
        flat = grpo_lib.build_batch([p.prompt_ids for p in rows], tokens, pad_id=pad_id,
                                    prompt_width=prompt_width, completion_width=C, keep=keep)
        flat["advantages"] = np.repeat(adv.advantages[:, None], C, axis=1).astype(np.float32)
        micro = cfg.train.grad_accum
        batch = {k: v.reshape(micro, v.shape[0] // micro, *v.shape[1:]) for k, v in flat.items()}
        zeros = np.zeros_like(batch["advantages"])
        batch["old_logps"], batch["ref_logps"] = zeros, zeros
        if mu > 1 or g.beta:
            old, ref = [], []
            for i in range(micro):
                mb = {k: batch[k][i] for k in ("input_ids", "positions", "segment_ids", "completion_ids")}
                if mu > 1:
                    old.append(np.asarray(score(lora_state, rest, mb, True)))
                if g.beta:
                    ref.append(np.asarray(score(ref_lora, rest, mb, True) if frozen_ref
                                          else score(lora_state, rest, mb, False)))
            if old:
                batch["old_logps"] = np.stack(old)
            if ref:
                batch["ref_logps"] = np.stack(ref)
        return Rollout(batch, rewards, total, adv, np.asarray([len(t) for t in tokens]), truncated,
                       time.perf_counter() - t0)

    before = {}
    if start == 0 and eval_prompts:
        before = run_eval(lora_state, 0)
        metrics.write(0, eval_row(before))
        (workdir / "eval_before.json").write_text(json.dumps(before))
    elif (workdir / "eval_before.json").exists():
        before = json.loads((workdir / "eval_before.json").read_text())

    # ---- the loop ---------------------------------------------------------------------------------
    bar = run_lib._progress(total_steps, start)
    step, failure, last_eval, rollout = start, None, None, None
    t_loop = time.perf_counter()
    gen_seconds = 0.0
    try:
        with loop.GracefulExit() as stop:
            while step < total_steps:
                t0 = time.perf_counter()
                if rollout is None or step % mu == 0:
                    rollout_data = it.state()
                    rollout = make_rollout(step - step % mu)
                    gen_seconds += rollout.seconds
                batch = loop.process_local_batch(rollout.batch, fns.batch_sharding)
                key = np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(base_key), step)))
                lora_state, opt_state, m = fns.train_step(lora_state, opt_state, rest, batch, key)
                m = jax.device_get(m)
                if not bool(m["finite"]):
                    failure = step + 1
                    raise run_lib.non_finite_stop(
                        ckpts, f"non-finite loss or gradient at step {step + 1} (loss={float(m['loss'])}, "
                        f"grad_norm={float(m['grad_norm'])})", failed_step=step + 1, bad_checkpoint=step)
                step += 1
                tokens = max(float(m["tokens"]), 1.0)
                row = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "lr": float(schedule(step - 1)),
                       **reward_metrics(rollout.rewards, rollout.total, names),
                       "frac_reward_zero_std": float(np.mean(rollout.advantages.zero_std)),
                       "completion_length": float(np.mean(rollout.lengths)),
                       "truncated": float(np.mean(rollout.truncated)), "completion_tokens": float(m["tokens"]),
                       "kl": float(m["kl"]) / tokens, "clip_ratio/low": float(m["clip_low"]) / tokens,
                       "clip_ratio/high": float(m["clip_high"]) / tokens,
                       "clip_ratio/region": (float(m["clip_low"]) + float(m["clip_high"])) / tokens,
                       "ratio": float(m["ratio"]) / tokens, "rollout_seconds": rollout.seconds,
                       "step_seconds": time.perf_counter() - t0}
                if step % cfg.train.log_every == 0 or step == total_steps:
                    metrics.write(step, row)
                if step == run_lib._FAULT_KILL_AT_STEP:  # fault injection for the resume test
                    os.kill(os.getpid(), signal.SIGKILL)
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and eval_prompts and step < total_steps:
                    ev = run_eval(lora_state, step)
                    metrics.write(step, eval_row(ev))
                    last_eval = (step, ev)
                if step % cfg.train.checkpoint_every == 0 or step == total_steps or stop.requested:
                    if not ckpt_lib.all_finite((lora_state, opt_state)):
                        failure = step
                        raise run_lib.non_finite_stop(ckpts, f"non-finite adapters or optimizer state after step "
                                                      f"{step} (not saved)", failed_step=step)
                    train_state = {"opt_state": opt_state, "rng": jax.make_array_from_process_local_data(repl, base_key)}
                    if frozen_ref:
                        train_state["ref_lora"] = ref_lora
                    ckpts.save(step, lora_state, train_state,
                               {"step": step, "data": it.state(), "rollout_data": rollout_data, "lora": record})
                if bar is not None:
                    bar.set_postfix(reward=f"{row['reward']:.3f}", loss=f"{row['loss']:.4f}")
                    bar.update(1)
                if stop.requested:
                    log.info("stop requested: checkpoint written at step %d", step)
                    break
    finally:
        if bar is not None:
            bar.close()
        ckpts.wait()
        metrics.close()

    # ---- after -----------------------------------------------------------------------------------
    result: dict[str, Any] = {**summary, "final_step": step, "train_seconds": round(time.perf_counter() - t_loop, 1),
                              "rollout_seconds": round(gen_seconds, 1), "failure_step": failure}
    finished = step >= total_steps
    result["finished"] = finished
    rows = [r for r in read_metrics(workdir / "metrics.jsonl") if "reward" in r]
    if rows:
        k = max(1, min(4, len(rows) // 4))
        result["train_reward_first"] = float(np.mean([r["reward"] for r in rows[:k]]))
        result["train_reward_last"] = float(np.mean([r["reward"] for r in rows[-k:]]))
        result["train_reward_window"] = k
    if finished and eval_prompts:
        after = last_eval[1] if last_eval is not None and last_eval[0] == step else run_eval(lora_state, step)
        if last_eval is None or last_eval[0] != step:
            MetricsWriter(workdir, tensorboard=False).write(step, eval_row(after))
        result["eval_before"], result["eval_after"] = before, after
    if finished and cfg.train.export_peft:
        run_lib._save_adapter(fns, lora_state, rest, workdir / "adapter", cfg)
        result["adapter_dir"] = str(workdir / "adapter")
    loss_plot = plot_loss(workdir, ylabel=f"GRPO loss ({g.loss_type})")
    reward_plot = plot_rewards(workdir, names)
    result["loss_plot"] = str(loss_plot) if loss_plot else None
    result["reward_plot"] = str(reward_plot) if reward_plot else None
    result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    ckpts.close()
    _print_end(result, names)
    return result


def _print_end(r: dict[str, Any], names: list[str]) -> None:
    if jax.process_index() != 0:
        return
    lines = [f"done: {r['final_step']}/{r['total_steps']} steps in {r['train_seconds']} s "
             f"({r['rollout_seconds']} s sampling and scoring)"]
    if "train_reward_first" in r:
        lines.append(f"train reward   {r['train_reward_first']:.3f} -> {r['train_reward_last']:.3f} "
                     f"(mean of the first / last {r['train_reward_window']} steps' rollouts)")
    if r.get("eval_before") and r.get("eval_after"):
        b, a = r["eval_before"], r["eval_after"]
        lines.append(f"eval reward    {b['reward']:.3f} -> {a['reward']:.3f} on {a['examples']} held-out prompts")
        for n in names:
            lines.append(f"  {n:<12} {b[f'rewards/{n}']:.3f} -> {a[f'rewards/{n}']:.3f}")
    for key, label in (("adapter_dir", "PEFT adapter"), ("reward_plot", "reward curve"), ("loss_plot", "loss curve")):
        if r.get(key):
            lines.append(f"{label:<14} {r[key]}")
    print("\n".join(lines), flush=True)


__all__ = ["GRPOObjective", "PromptIterator", "Sampler", "load_prompts", "policy_logps", "run_grpo",
           "validate_grpo_config"]
