"""Group relative policy optimization: pure functions of rewards, log-probs and masks.

Semantics are trl 1.16.0's (``GRPOTrainer._generate_and_score_completions`` and ``_compute_loss``):

* **Advantages.** Each prompt has a group of G completions (rows ``g*G .. g*G+G-1``).
  ``A_i = r_i - mean(group)``, divided by ``std + 1e-4`` unless ``scale_rewards="none"``; the std is
  the unbiased (Bessel-corrected) one of the group (``"group"``) or of the whole batch (``"batch"``).
  A NaN reward (no reward function scored the row) is left out of the statistics and gets A = 0.
* **Per-token loss.** With ``ratio = exp(logp - logp_old)`` and the k3 KL estimator to the reference
  ``kl = exp(ref - logp) - (ref - logp) - 1``::

      loss_t = -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * kl

* **Normalization** over the completion tokens (mask: every token up to and including the first
  end-of-sequence token):

      grpo     mean over each sequence's tokens, then mean over sequences
      bnpo     sum over the micro-batch's tokens / its number of tokens, averaged over micro-batches
      dr_grpo  sum over tokens / (sequences * max_completion_length)       (Dr. GRPO)
      dapo     sum over tokens / tokens of the whole optimizer step         (DAPO; trl's default)

  :func:`loss_sums` gives each as (numerator, weight) sums so gradient accumulation divides once per
  optimizer step, which reproduces trl's accumulation of each loss exactly.

Log-probs are of the *tempered* policy (logits / sampling temperature), as trl computes them.
Host-side helpers at the end lay out rollout rows (:func:`build_batch`) and sum rewards
(:func:`weighted_total`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.objectives.base import forward

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
# Which summed statistic divides the summed loss of one optimizer step (see loss_sums).
WEIGHT_KEYS = {"grpo": "sequences", "bnpo": "micro_batches", "dr_grpo": "sequences", "dapo": "tokens"}
STD_EPS = 1e-4  # trl: advantages / (std + 1e-4)


def _nanstd(x: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
    """Unbiased std ignoring NaNs (trl's ``nanstd``); NaN where fewer than two values."""
    mean = jnp.nanmean(x, axis=axis, keepdims=True)
    var = jnp.nanmean((x - mean) ** 2, axis=axis, keepdims=True)
    count = jnp.sum(~jnp.isnan(x), axis=axis, keepdims=True).astype(x.dtype)
    var = jnp.where(count > 1, var * count / jnp.maximum(count - 1, 1), jnp.nan)
    std = jnp.sqrt(var)
    return std if keepdims else jnp.squeeze(std, axis=axis)


class Advantages(NamedTuple):
    advantages: jax.Array  # [rows] float32
    group_mean: jax.Array  # [rows] the row's group mean reward
    std: jax.Array  # [rows] the std the row was (or, with scale "none", would have been) divided by
    zero_std: jax.Array  # [rows] bool: the std is zero (the group has no learning signal)


def group_advantages(rewards: jax.Array, num_generations: int, *, scale_rewards: str = "group") -> Advantages:
    """Group-normalized advantages of ``rewards [prompts * G]`` (each prompt's G rows adjacent)."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if num_generations < 2:
        raise ValueError(f"num_generations must be >= 2 (a group needs a baseline), got {num_generations}")
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim != 1 or r.shape[0] % num_generations:
        raise ValueError(f"rewards must be [prompts * {num_generations}], got shape {r.shape}")
    grouped = r.reshape(-1, num_generations)
    mean = jnp.repeat(jnp.nanmean(grouped, axis=1), num_generations)
    if scale_rewards == "batch":
        std = jnp.broadcast_to(_nanstd(r), r.shape)
    else:  # "group"; with "none" only reported
        std = jnp.repeat(_nanstd(grouped, axis=1), num_generations)
    adv = r - mean
    if scale_rewards != "none":
        adv = adv / (std + STD_EPS)
    return Advantages(jnp.nan_to_num(adv, nan=0.0), mean, std, jnp.isclose(std, 0.0))


def completion_mask(completion_ids: jax.Array, stop_ids, valid: jax.Array | None = None) -> jax.Array:
    """float32 ``[rows, C]``: 1 up to and including each row's first stop token, 0 after it.

    ``valid [rows, C]`` (optional): tokens that exist at all (right padding is 0).
    """
    ids = jnp.asarray(completion_ids)
    is_stop = jnp.isin(ids, jnp.asarray(stop_ids, ids.dtype))
    if valid is not None:
        is_stop = is_stop & (jnp.asarray(valid) > 0)
    c = ids.shape[-1]
    first = jnp.where(is_stop.any(-1), jnp.argmax(is_stop, axis=-1), c)
    mask = jnp.arange(c)[None, :] <= first[:, None]
    if valid is not None:
        mask = mask & (jnp.asarray(valid) > 0)
    return mask.astype(jnp.float32)


def kl_k3(logps: jax.Array, ref_logps: jax.Array) -> jax.Array:
    """Per-token k3 estimator of KL(policy || reference): ``exp(d) - d - 1`` with ``d = ref - logp``."""
    d = ref_logps - logps
    return jnp.exp(d) - d - 1.0


class TokenLoss(NamedTuple):
    loss: jax.Array  # [rows, C] per-token loss (not masked)
    ratio: jax.Array  # [rows, C] exp(logp - logp_old)
    kl: jax.Array  # [rows, C] k3 KL to the reference (zeros when beta == 0)
    clipped_low: jax.Array  # [rows, C] bool: ratio < 1 - epsilon with A < 0 (the clip binds)
    clipped_high: jax.Array  # [rows, C] bool: ratio > 1 + epsilon_high with A > 0


def per_token_loss(logps: jax.Array, old_logps: jax.Array, advantages: jax.Array, *, epsilon: float,
                   epsilon_high: float | None = None, beta: float = 0.0,
                   ref_logps: jax.Array | None = None) -> TokenLoss:
    """The clipped surrogate plus ``beta`` times the k3 KL, per token.

    ``logps, old_logps, ref_logps [rows, C]``; ``advantages [rows]`` or ``[rows, C]``.
    ``epsilon_high`` defaults to ``epsilon`` (DAPO's clip-higher sets it above).
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    adv = jnp.asarray(advantages, jnp.float32)
    if adv.ndim == 1:
        adv = adv[:, None]
    ratio = jnp.exp(logps - old_logps)
    clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + eps_high)
    loss = -jnp.minimum(ratio * adv, clipped * adv)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps")
        kl = kl_k3(logps, ref_logps)
        loss = loss + beta * kl
    else:
        kl = jnp.zeros_like(loss)
    low = (ratio < 1.0 - epsilon) & (adv < 0)
    high = (ratio > 1.0 + eps_high) & (adv > 0)
    return TokenLoss(loss, ratio, kl, low, high)


def loss_sums(token_loss: jax.Array, mask: jax.Array, *, loss_type: str,
              max_completion_length: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(numerator, {"sequences", "tokens", "micro_batches"}) of one micro-batch.

    The loss of an optimizer step is ``sum(numerators) / sum(weights[WEIGHT_KEYS[loss_type]])``
    over its micro-batches; with a single micro-batch this is :func:`grpo_loss`.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    mask = jnp.asarray(mask, jnp.float32)
    masked = token_loss * mask
    tokens = jnp.sum(mask)
    weights = {"sequences": jnp.float32(mask.shape[0]), "tokens": tokens, "micro_batches": jnp.float32(1.0)}
    if loss_type == "grpo":
        num = jnp.sum(jnp.sum(masked, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0))
    elif loss_type == "bnpo":
        num = jnp.sum(masked) / jnp.maximum(tokens, 1.0)
    elif loss_type == "dr_grpo":
        num = jnp.sum(masked) / max_completion_length
    else:  # dapo
        num = jnp.sum(masked)
    return num, weights


def grpo_loss(token_loss: jax.Array, mask: jax.Array, *, loss_type: str, max_completion_length: int) -> jax.Array:
    """The scalar loss of one batch (one micro-batch, one process), normalized as ``loss_type``."""
    num, w = loss_sums(token_loss, mask, loss_type=loss_type, max_completion_length=max_completion_length)
    return num / jnp.maximum(w[WEIGHT_KEYS[loss_type]], 1.0)


def _chunk_logps(h: jax.Array, w: jax.Array, t: jax.Array, temperature: float,
                 logit_soft_cap: float | None = None) -> jax.Array:
    """log softmax(cap(h @ w.T) / temperature)[t]: h [c, d], w [v, d], t [c] -> [c] float32."""
    logits = jnp.einsum("cd,vd->cv", h, w, preferred_element_type=jnp.float32)
    if logit_soft_cap is not None:  # gemma2's final soft cap, as logits_from_hidden applies it
        logits = logit_soft_cap * jnp.tanh(logits / logit_soft_cap)
    if temperature != 1.0:
        logits = logits / temperature
    picked = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def completion_logps(hidden: jax.Array, head_weight: jax.Array, completion_ids: jax.Array, *,
                     temperature: float = 1.0, chunk_size: int = 256,
                     logit_soft_cap: float | None = None) -> jax.Array:
    """Per-token log-probs of the completion tokens: float32 ``[rows, C]``.

    ``hidden [rows, C, d]``: the final hidden states at the positions that *predict* the completion
    tokens (the last prompt position and the completion positions but the last);
    ``head_weight [vocab, d]``; ``completion_ids [rows, C]``. The vocabulary projection runs
    ``chunk_size`` tokens at a time and is recomputed in the backward pass, so ``[rows, C, vocab]``
    logits never exist.
    """
    rows, c, d = hidden.shape
    n = rows * c
    chunk = min(chunk_size, n)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0))).reshape(n_chunks, chunk, d)
    t = jnp.pad(completion_ids.reshape(n), (0, pad)).reshape(n_chunks, chunk)
    body = jax.checkpoint(lambda hc, tc: _chunk_logps(hc, head_weight, tc, temperature, logit_soft_cap),
                          prevent_cse=False)
    out = jax.lax.map(lambda ht: body(ht[0], ht[1]), (h, t))
    return out.reshape(-1)[:n].reshape(rows, c)


# -- host-side: rollout rows and rewards ------------------------------------------------------------


def build_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], *, pad_id: int, prompt_width: int,
                completion_width: int, keep: list[bool] | None = None) -> dict[str, np.ndarray]:
    """Rows ``[prompt left-padded to prompt_width | completion right-padded to completion_width]``.

    ``completion_mask`` is 1 on every generated token (the stop token included); ``keep[r] = False``
    zeroes a row's mask (truncated completions with ``mask_truncated_completions``).
    """
    rows, p_w, c_w = len(prompt_ids), prompt_width, completion_width
    input_ids = np.full((rows, p_w + c_w), pad_id, np.int32)
    segment_ids = np.zeros((rows, p_w + c_w), np.int32)
    comp = np.full((rows, c_w), pad_id, np.int32)
    mask = np.zeros((rows, c_w), np.float32)
    for r, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        c = c[:c_w]
        input_ids[r, p_w - len(p):p_w] = p
        input_ids[r, p_w:p_w + len(c)] = c
        segment_ids[r, p_w - len(p):p_w + len(c)] = 1
        comp[r, :len(c)] = c
        mask[r, :len(c)] = 1.0 if keep is None or keep[r] else 0.0
    positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
    return {"input_ids": input_ids, "positions": positions, "segment_ids": segment_ids, "completion_ids": comp,
            "completion_mask": mask}


def weighted_total(rewards: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """trl's sum_then_normalize: nansum of weighted rewards; NaN when no function scored the row."""
    total = np.nansum(rewards * weights[None, :], axis=1).astype(np.float32)
    total[np.isnan(rewards).all(axis=1)] = np.nan
    return total


# -- the objective ---------------------------------------------------------------------------------


def policy_logps(graphdef, lora, rest, batch, *, lora_enabled: bool = True, key=None, deterministic: bool = True,
                 temperature: float = 1.0) -> jax.Array:
    """Per-token log-probs ``[rows, C]`` of ``batch["completion_ids"]``: rows are the left-padded prompt
    (width P) then the completion, so the hidden states at P-1 .. P+C-2 predict the C completion tokens."""
    model, h = forward(graphdef, lora, rest, batch, lora_enabled=lora_enabled, key=key, deterministic=deterministic)
    c = batch["completion_ids"].shape[-1]
    p = batch["input_ids"].shape[-1] - c
    return completion_logps(h[:, p - 1:p - 1 + c], model.lm_head_weight(), batch["completion_ids"],
                            temperature=temperature, logit_soft_cap=model.config.final_logit_softcap)


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
        return WEIGHT_KEYS[self.loss_type]

    def reference(self, graphdef, lora, rest, batch, ref_lora):
        return None

    def loss_sums(self, graphdef, lora, rest, batch, key, reference):
        logps = policy_logps(graphdef, lora, rest, batch, key=key, deterministic=False, temperature=self.temperature)
        old = batch["old_logps"] if self.use_old_logps else jax.lax.stop_gradient(logps)
        tl = per_token_loss(logps, old, batch["advantages"], epsilon=self.epsilon,
                                     epsilon_high=self.epsilon_high, beta=self.beta,
                                     ref_logps=batch["ref_logps"] if self.beta else None)
        mask = batch["completion_mask"]
        num, weights = loss_sums(tl.loss, mask, loss_type=self.loss_type,
                                          max_completion_length=self.max_completion_length)
        f32 = jnp.float32
        stats = {**weights, "kl": jnp.sum(tl.kl * mask), "clip_low": jnp.sum(tl.clipped_low.astype(f32) * mask),
                 "clip_high": jnp.sum(tl.clipped_high.astype(f32) * mask), "ratio": jnp.sum(tl.ratio * mask)}
        return num, stats


def reward_metrics(rewards: np.ndarray, total: np.ndarray, names: list[str], prefix: str = "") -> dict[str, float]:
    out = {f"{prefix}reward": float(np.nanmean(total)) if np.isfinite(total).any() else float("nan"),
           f"{prefix}reward_std": float(np.nanstd(total, ddof=1)) if np.isfinite(total).sum() > 1 else 0.0}
    for j, name in enumerate(names):
        col = rewards[:, j]
        out[f"{prefix}rewards/{name}"] = float(np.nanmean(col)) if np.isfinite(col).any() else float("nan")
    return out


__all__ = [
    "GRPOObjective", "policy_logps", "reward_metrics", "LOSS_TYPES", "SCALE_REWARDS", "WEIGHT_KEYS", "Advantages", "TokenLoss", "build_batch", "completion_logps",
    "completion_mask", "group_advantages", "grpo_loss", "kl_k3", "loss_sums", "per_token_loss", "weighted_total",
]
