"""GRPO: advantages and losses against a direct numpy computation and trl 1.16.0's own
``GRPOTrainer._compute_loss`` (called on a stand-in trainer), the policy gradient at ratio 1 against
REINFORCE computed through an independent log-prob path, the KL term at policy == reference, the
reward functions, config errors, and SIGKILL + resume through the CLI.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _support import require

torch = require("torch")
transformers = require("transformers")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import grpo as grpo_config  # noqa: E402
from qlora_jax.checkpoints import gguf_tokenizer, resolve_builtin  # noqa: E402
from qlora_jax.checkpoints.load import load_model  # noqa: E402
from qlora_jax.lora import LoraConfig  # noqa: E402
from qlora_jax.objectives import grpo as grpo_lib  # noqa: E402
from qlora_jax.objectives import rewards as rewards_lib  # noqa: E402
from qlora_jax.objectives.grpo import (  # noqa: E402
    GRPOObjective,
    build_batch,  # noqa: E402
    policy_logps,
)
from qlora_jax.objectives.logprobs import sequence_logprob  # noqa: E402
from qlora_jax.train import loop  # noqa: E402
from qlora_jax.train.config import ConfigError  # noqa: E402
from qlora_jax.train.config import validate_config as validate_grpo_config  # noqa: E402
from qlora_jax.train.metrics import read_metrics  # noqa: E402
from qlora_jax.train.rollout import PromptIterator  # noqa: E402

LOSS_TYPES = grpo_lib.LOSS_TYPES


# -- advantages --------------------------------------------------------------------------------------


def _np_advantages(r, g, scale):
    """Direct numpy: group mean, unbiased std (ddof=1) over the finite rewards, / (std + 1e-4)."""
    r = np.asarray(r, np.float64)
    grouped = r.reshape(-1, g)
    mean = np.repeat([np.nanmean(x) for x in grouped], g)
    if scale == "batch":
        std = np.full_like(r, np.std(r[np.isfinite(r)], ddof=1))
    else:
        std = np.repeat([np.std(x[np.isfinite(x)], ddof=1) if np.isfinite(x).sum() > 1 else np.nan
                         for x in grouped], g)
    adv = r - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return np.nan_to_num(adv, nan=0.0), std


@pytest.mark.parametrize("scale", grpo_lib.SCALE_REWARDS)
@pytest.mark.parametrize("g", [2, 4, 8])
def test_advantages_match_numpy_and_trl_std(scale, g):
    from trl.trainer.utils import nanstd

    rng = np.random.default_rng(g)
    r = rng.normal(size=6 * g).astype(np.float32)
    r[:g] = 0.5  # a group without signal: advantages 0, zero std flagged
    r[g + 1] = np.nan  # an unscorable row: left out of its group's statistics, advantage 0
    out = grpo_lib.group_advantages(r, g, scale_rewards=scale)
    want, std = _np_advantages(r, g, scale)
    np.testing.assert_allclose(np.asarray(out.advantages), want, rtol=2e-5, atol=2e-5)
    assert np.all(np.asarray(out.advantages)[:g] == 0)
    assert bool(np.asarray(out.zero_std)[0]) == (scale != "batch")  # trl flags the std it divides by
    assert float(out.advantages[g + 1]) == 0.0
    # the std is trl's own (torch, Bessel-corrected, NaN-aware)
    t = torch.from_numpy(r.astype(np.float64))
    trl_std = nanstd(t) if scale == "batch" else nanstd(t.view(-1, g), dim=1).repeat_interleave(g)
    np.testing.assert_allclose(np.asarray(out.std), trl_std.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.std)[g:], std[g:], rtol=1e-5)


def test_advantages_reject_bad_groups():
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        grpo_lib.group_advantages(np.zeros(4), 1)
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo_lib.group_advantages(np.zeros(4), 2, scale_rewards="yes")
    with pytest.raises(ValueError, match=r"rewards must be \[prompts \* 4\]"):
        grpo_lib.group_advantages(np.zeros(6), 4)


def test_completion_mask_stops_after_first_eos():
    ids = np.array([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 1, 1, 1, 1], [4, 3, 0, 0, 0]])
    valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    mask = np.asarray(grpo_lib.completion_mask(ids, [2, 0], valid))
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])


# -- the loss vs numpy and trl -------------------------------------------------------------------------


def _random_case(rng, rows=6, c=7):
    logps = rng.normal(-2.0, 0.8, (rows, c)).astype(np.float32)
    old = (logps + rng.normal(0, 0.3, (rows, c))).astype(np.float32)  # ratios on both sides of the clip range
    ref = (logps + rng.normal(0, 0.5, (rows, c))).astype(np.float32)
    adv = rng.normal(size=rows).astype(np.float32)
    lengths = rng.integers(1, c + 1, rows)
    lengths[0] = c
    mask = (np.arange(c)[None, :] < lengths[:, None]).astype(np.float32)
    return logps, old, ref, adv, mask


def _np_loss(logps, old, ref, adv, mask, *, loss_type, beta, eps, eps_high, max_len):
    ratio = np.exp(logps - old)
    a = adv[:, None]
    per_token = -np.minimum(ratio * a, np.clip(ratio, 1 - eps, 1 + eps_high) * a)
    if beta:
        per_token = per_token + beta * (np.exp(ref - logps) - (ref - logps) - 1)
    if loss_type == "grpo":
        return np.mean((per_token * mask).sum(1) / np.maximum(mask.sum(1), 1))
    if loss_type in ("bnpo", "dapo"):
        return (per_token * mask).sum() / max(mask.sum(), 1)
    return (per_token * mask).sum() / (len(mask) * max_len)


def _trl_loss(micro_batches, *, loss_type, beta, eps, eps_high, max_len):
    """trl 1.16.0's loss summed over gradient-accumulation micro-batches, and d loss / d logps.

    Each micro-batch is (logps, old, ref, adv, mask); a stand-in trainer hands ``_compute_loss`` the
    per-token log-probs (with gradients) instead of running a model.
    """
    from trl import GRPOTrainer

    n_micro = len(micro_batches)
    total_tokens = sum(float(mb[4].sum()) for mb in micro_batches)
    loss_sum, grads = 0.0, []
    for logps, old, ref, adv, mask in micro_batches:
        rows, c = logps.shape
        t_logps = torch.tensor(logps, dtype=torch.float64, requires_grad=True)
        args = types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=n_micro)
        accelerator = types.SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                            reduce=lambda x, reduction="sum": x)
        outputs = (t_logps, torch.zeros(rows, c, dtype=torch.float64), None)  # log-probs, entropies, aux loss
        trainer = types.SimpleNamespace(
            _get_per_token_logps_and_entropies=lambda *a, outputs=outputs, **k: outputs,
            top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
            args=args, loss_type=loss_type, epsilon_low=eps, epsilon_high=eps_high, use_vllm=False,
            vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
            current_gradient_accumulation_steps=n_micro, max_completion_length=max_len, accelerator=accelerator,
            _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics={"train": defaultdict(list)})
        inputs = {"prompt_ids": torch.ones(rows, 3, dtype=torch.long), "prompt_mask": torch.ones(rows, 3),
                  "completion_ids": torch.ones(rows, c, dtype=torch.long),
                  "completion_mask": torch.tensor(mask, dtype=torch.float64), "advantages": torch.tensor(adv, dtype=torch.float64),
                  "old_per_token_logps": torch.tensor(old, dtype=torch.float64),
                  "ref_per_token_logps": torch.tensor(ref, dtype=torch.float64),
                  "num_items_in_batch": torch.tensor(total_tokens, dtype=torch.float64)}
        loss = GRPOTrainer._compute_loss(trainer, None, inputs)
        loss.backward()
        loss_sum += float(loss.detach())
        grads.append(t_logps.grad.numpy())
    return loss_sum, grads


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta,eps,eps_high", [(0.0, 0.2, 0.2), (0.04, 0.2, 0.28)])
def test_loss_equals_numpy_and_trl(loss_type, beta, eps, eps_high):
    rng = np.random.default_rng(len(loss_type) + int(beta * 100))
    max_len = 9
    case = _random_case(rng, rows=6, c=7)
    logps, old, ref, adv, mask = case
    kw = dict(epsilon=eps, epsilon_high=eps_high, beta=beta)
    tl = grpo_lib.per_token_loss(jnp.asarray(logps), jnp.asarray(old), jnp.asarray(adv), ref_logps=jnp.asarray(ref), **kw)
    ours = float(grpo_lib.grpo_loss(tl.loss, mask, loss_type=loss_type, max_completion_length=max_len))
    want = _np_loss(*case, loss_type=loss_type, beta=beta, eps=eps, eps_high=eps_high, max_len=max_len)
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-6)
    assert 0 < float(((tl.clipped_low | tl.clipped_high) * mask).sum()) < mask.sum()  # the clip binds somewhere

    # gradient accumulation over 3 micro-batches of different token counts: our (sum of numerators) /
    # (sum of weights) equals trl's summed micro-batch losses, value and gradient w.r.t. the log-probs
    micro = [_random_case(rng, rows=4, c=7) for _ in range(3)]
    trl_loss, trl_grads = _trl_loss(micro, loss_type=loss_type, beta=beta, eps=eps, eps_high=eps_high, max_len=max_len)

    def accumulated(all_logps):
        nums, weights = [], []
        for lp, (_, o, r, a, m) in zip(all_logps, micro):
            t = grpo_lib.per_token_loss(lp, jnp.asarray(o), jnp.asarray(a), ref_logps=jnp.asarray(r), **kw)
            n, w = grpo_lib.loss_sums(t.loss, m, loss_type=loss_type, max_completion_length=max_len)
            nums.append(n)
            weights.append(w[grpo_lib.WEIGHT_KEYS[loss_type]])
        return sum(nums) / sum(weights)

    all_logps = [jnp.asarray(mb[0]) for mb in micro]
    value, grads = jax.value_and_grad(accumulated)(all_logps)
    np.testing.assert_allclose(float(value), trl_loss, rtol=1e-5, atol=1e-6)
    for g_ours, g_trl, mb in zip(grads, trl_grads, micro):
        np.testing.assert_allclose(np.asarray(g_ours) * mb[4], g_trl * mb[4], rtol=1e-4, atol=1e-7)


def test_kl_k3_is_zero_at_equality_and_positive_elsewhere():
    x = jnp.asarray(np.random.default_rng(0).normal(size=50), jnp.float32)
    assert float(jnp.max(jnp.abs(grpo_lib.kl_k3(x, x)))) == 0.0
    assert float(jnp.min(grpo_lib.kl_k3(x, x + 0.3))) > 0.0


# -- the model: REINFORCE at ratio 1, KL at the reference ---------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return gguf_tokenizer(resolve_builtin("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tok) -> Path:
    """A 2-layer random LLaMA (tied embeddings) saved by transformers, with SmolLM2's tokenizer."""
    d = tmp_path_factory.mktemp("tiny_llama_grpo")
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _rollout_like(rng, rows=6, c=6, vocab=400):
    """Prompts of different lengths and completions of different lengths (token ids)."""
    prompts = [list(rng.integers(5, vocab, rng.integers(3, 9))) for _ in range(rows)]
    completions = [list(rng.integers(5, vocab, rng.integers(1, c + 1))) for _ in range(rows)]
    completions[0] = list(rng.integers(5, vocab, c))
    return prompts, completions


_policy_logps = jax.jit(policy_logps, static_argnums=(0,), static_argnames=("lora_enabled", "temperature"))


@pytest.fixture(scope="module")
def tiny_policy(tiny_model_dir):
    """(graphdef, lora, rest) of the tiny model in NF4 with B != 0 (the adapters change the model)."""
    model, _ = load_model(str(tiny_model_dir), quantize="nf4", lora=LoraConfig(r=4, alpha=8.0, targets="all-linear"))
    for view in model.iter_linears():
        b = view.linear.lora_b.get_value()
        view.linear.lora_b.set_value(jax.random.normal(jax.random.key(1), b.shape, b.dtype) * 0.05)
    return loop.split_model(model)


@pytest.fixture(scope="module")
def reinforce_case(tiny_policy):
    """A rollout-like batch, advantages, and each sequence's gradient of its summed completion
    log-prob through DPO's path (``sequence_logprob`` on [prompt | completion] rows without left
    padding, right-padded to one length, one row at a time)."""
    graphdef, lora, rest = tiny_policy
    from flax import nnx

    rng = np.random.default_rng(3)
    c = 6
    prompts, completions = _rollout_like(rng, rows=6, c=c)
    batch = build_batch(prompts, completions, pad_id=0, prompt_width=max(map(len, prompts)), completion_width=c)
    adv = rng.normal(size=len(prompts)).astype(np.float32)
    batch["advantages"] = np.repeat(adv[:, None], c, axis=1)
    batch["old_logps"] = batch["ref_logps"] = np.zeros((len(prompts), c), np.float32)

    @jax.jit
    def seq_logp_grad(adapters, seq, targets, loss_mask):
        def seq_logp(a):
            model = nnx.merge(graphdef, a, rest)
            return sequence_logprob(model.hidden_states(seq), model.lm_head_weight(), targets, loss_mask)[0]
        return jax.grad(seq_logp)(adapters)

    length = max(len(p) + len(y) for p, y in zip(prompts, completions))
    grads = []
    for p, y in zip(prompts, completions):
        seq = np.zeros((1, length), np.int32)
        seq[0, :len(p) + len(y)] = p + y
        targets = np.concatenate([seq[:, 1:], np.zeros((1, 1), np.int32)], axis=1)
        loss_mask = np.zeros_like(seq)
        loss_mask[0, len(p) - 1:len(p) - 1 + len(y)] = 1
        grads.append(seq_logp_grad(lora, seq, targets, loss_mask))
    return batch, adv, np.asarray([len(y) for y in completions], np.float32), grads


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_ratio_one_gradient_is_reinforce(tiny_policy, reinforce_case, loss_type):
    """beta = 0 and old = current policy: the gradient is -sum_i A_i w_i grad(sum_t log p(y_it)), with
    w_i = 1 / tokens (bnpo, dapo), 1 / (rows * len_i) (grpo) or 1 / (rows * C) (dr_grpo)."""
    graphdef, lora, rest = tiny_policy
    batch, adv, lengths, seq_grads = reinforce_case
    rows, c = batch["completion_ids"].shape
    objective = GRPOObjective(loss_type=loss_type, beta=0.0, epsilon=0.2, epsilon_high=0.2, max_completion_length=c)

    def ours(adapters):
        num, w = objective.loss_sums(graphdef, adapters, rest, batch, None, None)
        return num / w[objective.weight_key]

    g_ours = jax.jit(jax.grad(ours))(lora)
    weight = {"grpo": 1 / (rows * lengths), "dr_grpo": np.full(rows, 1 / (rows * c)),
              "bnpo": np.full(rows, 1 / lengths.sum()), "dapo": np.full(rows, 1 / lengths.sum())}[loss_type]
    g_ref = jax.tree.map(lambda *gs: -sum(float(a * w) * g for a, w, g in zip(adv, weight, gs)), *seq_grads)
    flat_ours, flat_ref = jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)
    scale = max(float(jnp.max(jnp.abs(x))) for x in flat_ref)
    assert scale > 0
    for a, b in zip(flat_ours, flat_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)


def test_kl_is_zero_when_policy_is_the_reference(tiny_model_dir):
    """Adapters at init (B = 0): log-probs with adapters on equal those with adapters off, so the k3 KL
    is 0 and beta changes nothing; with B != 0 the KL is positive."""
    model, _ = load_model(str(tiny_model_dir), quantize="nf4", lora=LoraConfig(r=4, alpha=8.0, targets="all-linear"))
    graphdef, lora, rest = loop.split_model(model)
    rng = np.random.default_rng(5)
    prompts, completions = _rollout_like(rng, rows=4, c=5)
    batch = build_batch(prompts, completions, pad_id=0, prompt_width=max(map(len, prompts)), completion_width=5)
    on = _policy_logps(graphdef, lora, rest, batch)
    off = _policy_logps(graphdef, lora, rest, batch, lora_enabled=False)
    np.testing.assert_array_equal(np.asarray(on), np.asarray(off))
    mask = batch["completion_mask"]
    adv = rng.normal(size=4).astype(np.float32)
    losses = []
    for beta in (0.0, 0.5):
        tl = grpo_lib.per_token_loss(on, jax.lax.stop_gradient(on), adv, epsilon=0.2, beta=beta, ref_logps=off)
        assert float(jnp.sum(tl.kl * mask)) == 0.0
        losses.append(float(grpo_lib.grpo_loss(tl.loss, mask, loss_type="dapo", max_completion_length=5)))
    assert losses[0] == losses[1]
    for view in model.iter_linears():
        b = view.linear.lora_b.get_value()
        view.linear.lora_b.set_value(jax.random.normal(jax.random.key(2), b.shape, b.dtype) * 0.05)
    graphdef, lora, rest = loop.split_model(model)
    moved = _policy_logps(graphdef, lora, rest, batch)
    assert float(jnp.sum(grpo_lib.kl_k3(moved, off) * mask)) > 0.0


def test_left_padded_rows_score_like_unpadded_sequences(tiny_policy):
    """policy_logps on [left-padded prompt | completion] rows equals a full forward of each sequence."""
    graphdef, lora, rest = tiny_policy
    from flax import nnx

    rng = np.random.default_rng(9)
    prompts, completions = _rollout_like(rng, rows=5, c=4)
    batch = build_batch(prompts, completions, pad_id=0, prompt_width=16, completion_width=4)
    ours = np.asarray(_policy_logps(graphdef, lora, rest, batch, temperature=0.7))
    model = nnx.merge(graphdef, lora, rest)
    for i, (p, y) in enumerate(zip(prompts, completions)):
        seq = np.zeros((1, 20), np.int32)  # right padding: causal, so the scored positions do not see it
        seq[0, :len(p) + len(y)] = p + y
        logits = np.asarray(model(jnp.asarray(seq)), np.float64)[0] / 0.7
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        want = [logp[len(p) - 1 + t, y[t]] for t in range(len(y))]
        np.testing.assert_allclose(ours[i, :len(y)], want, rtol=1e-4, atol=1e-4)
        assert np.all(batch["completion_mask"][i] == (np.arange(4) < len(y)))


# -- rewards ----------------------------------------------------------------------------------------------


def test_format_and_exact_match_rewards_on_crafted_strings():
    cases = [  # (completion, format, exact match against "12")
        ("7 + 5 = 12 ##### 12", 1.0, 1.0),
        ("Seven plus five is twelve.\n#####\n12.", 1.0, 1.0),
        ("7 + 5 = 12 ##### 12.0", 1.0, 1.0),
        ("7 + 5 = 12 ##### 13", 1.0, 0.0),
        ("7 + 5 = 12 ##### twelve apples", 1.0, 0.0),
        ("##### 12", 0.0, 0.0),  # no reasoning
        ("7 + 5 = 12 #####", 0.0, 0.0),  # no answer
        ("7 + 5 = 12 #### 12", 0.0, 0.0),  # four hashes
        ("7 + 5 = 12 ###### 12", 0.0, 0.0),  # six hashes
        ("a ##### b ##### 12", 0.0, 0.0),  # two separators
        ("The answer is 12", 0.0, 0.0),
    ]
    texts = [c[0] for c in cases]
    assert rewards_lib.format_reward(None, texts) == [c[1] for c in cases]
    assert rewards_lib.exact_match_reward(None, texts, answer=["12"] * len(cases)) == [c[2] for c in cases]
    assert rewards_lib.split_reasoning_answer("Seven plus five.\n#####\n 12 ") == ("Seven plus five.", "12")
    assert rewards_lib.normalize_answer(' "1,200." ') == rewards_lib.normalize_answer("1200.0") == "1200"
    assert rewards_lib.normalize_answer("Paris ") == rewards_lib.normalize_answer("paris.")
    with pytest.raises(rewards_lib.RewardError, match="'answer' column"):
        rewards_lib.exact_match_reward(None, texts)


def test_prompt_iterator_state_names_its_prompts():
    """A GRPO checkpoint's prompt position is refused on other prompts (as the SFT/DPO iterators'
    positions are on other data), accepted on the same ones and from checkpoints without a fingerprint."""
    from qlora_jax.train.rollout import PromptExample

    prompts = [PromptExample("a", [1, 2, 3], {}), PromptExample("b", [4, 5], {}), PromptExample("c", [6], {})]
    it = PromptIterator(3, 2, seed=1, prompts=prompts)
    it.next_indices()
    state = it.state()
    same = PromptIterator(3, 2, seed=1, prompts=[PromptExample(p.prompt, list(p.prompt_ids), {}) for p in prompts])
    same.restore(state)
    assert same.state() == state and same.next_indices() == it.next_indices()
    changed = prompts[:2] + [PromptExample("c", [7], {})]
    for other in (PromptIterator(3, 2, seed=1, prompts=changed), PromptIterator(3, 1, seed=1, prompts=prompts)):
        with pytest.raises(ValueError, match="different prompts or batching settings"):
            other.restore(state)
    older = PromptIterator(3, 2, seed=1, prompts=changed)
    older.restore({"epoch": 0, "position": 2})  # written before positions carried a fingerprint
    assert older.state()["position"] == 2


def test_reward_functions_resolve_by_name_and_path(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("def shout(prompts, completions, **kw):\n    return [c.count('!') if c else None for c in completions]\n")
    assert rewards_lib.resolve_reward("format") is rewards_lib.format_reward
    assert rewards_lib.resolve_reward("qlora_jax.rewards:exact_match_reward") is rewards_lib.exact_match_reward
    assert rewards_lib.resolve_reward("qlora_jax.rewards.format_reward") is rewards_lib.format_reward
    shout = rewards_lib.resolve_reward(f"{f}:shout")
    fns = [("format", rewards_lib.format_reward), ("shout", shout)]
    out = rewards_lib.compute_rewards(fns, ["p"] * 3, ["a ##### b", "hi!!", ""], {"answer": ["b", "c", "d"]})
    np.testing.assert_array_equal(out[:, 0], [1, 0, 0])
    np.testing.assert_array_equal(out[:2, 1], [0, 2])
    assert np.isnan(out[2, 1])
    for spec, message in [("nope", "unknown reward function 'nope'"), ("no_such_module:f", "cannot import module"),
                          ("qlora_jax.rewards:missing", "has no attribute 'missing'"),
                          (f"{tmp_path}/absent.py:f", "not found")]:
        with pytest.raises(rewards_lib.RewardError, match=re.escape(message)):
            rewards_lib.resolve_reward(spec)
    with pytest.raises(rewards_lib.RewardError, match="returned 1 values for 2 completions"):
        rewards_lib.compute_rewards([("bad", lambda prompts, completions, **kw: [1.0])], ["p", "q"], ["a", "b"])


def test_prompt_iterator_resumes_and_reshuffles():
    it = PromptIterator(5, 2, seed=3)
    first = [it.next_indices() for _ in range(3)]  # crosses the epoch boundary
    assert sorted(first[0] + first[1] + first[2][:1]) == list(range(5))
    again = PromptIterator(5, 2, seed=3)
    again.next_indices()
    state = again.state()
    resumed = PromptIterator(5, 2, seed=3)
    resumed.restore(state)
    assert [resumed.next_indices() for _ in range(2)] == first[1:]


# -- config and the trainer end to end -----------------------------------------------------------------------


def _set(c, overrides):
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def test_config_errors_name_the_key(tmp_path):
    validate_grpo_config(grpo_config.get_config())
    for overrides, message in [
        ({"grpo.num_generations": 1}, "config.grpo.num_generations=1: must be >= 2"),
        ({"grpo.loss_type": "ppo"}, "config.grpo.loss_type='ppo'"),
        ({"grpo.scale_rewards": "std"}, "config.grpo.scale_rewards='std'"),
        ({"grpo.reward_funcs": "format,missing_fn"}, "config.grpo.reward_funcs='format,missing_fn'"),
        ({"grpo.reward_funcs": "no_such_pkg.mod:fn"}, "cannot import module 'no_such_pkg.mod'"),
        ({"grpo.reward_weights": "1.0"}, "config.grpo.reward_weights='1.0': 1 weights for 2 reward functions"),
        ({"grpo.num_generations": 6}, "must be a multiple of config.grpo.num_generations=6"),
        ({"grpo.num_iterations": 3}, "config.train.checkpoint_every=4: must be a multiple of config.grpo.num_iterations=3"),
        ({"grpo.temperature": 0.0}, "config.grpo.temperature=0.0: must be > 0"),
        ({"grpo.reference": "init"}, "config.grpo.reference='init' needs config.model.init_from"),
        ({"lora.r": 0}, "config.lora.r=0: must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate_grpo_config(_set(grpo_config.get_config(), overrides))
    # through the CLI: exit code 2 and the key named, before any model is loaded
    args = [sys.executable, "-m", "qlora_jax.train", "--config", str(REPO / "configs/grpo.py"),
            "--config.grpo.num_generations=1", "--config.grpo.loss_type=ppo", f"--config.workdir={tmp_path / 'w'}"]
    proc = subprocess.run(args, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config.grpo.num_generations=1" in proc.stderr and "config.grpo.loss_type='ppo'" in proc.stderr


REWARD_FILE = '''
def length_reward(prompts, completions, **columns):
    """Characters of the completion (random tokens from the tiny model: varies within a group)."""
    assert len(columns["answer"]) == len(completions)
    return [len(c) / 40.0 for c in completions]
'''


def _train_cli(overrides: dict, env_extra: dict | None = None, cache: Path | None = None):
    args = [sys.executable, "-m", "qlora_jax.train", "--config", str(REPO / "configs/grpo.py")]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_killed_run_resumes_with_identical_metrics(tiny_model_dir, tmp_path):
    """mu = 2 (old log-probs), beta > 0 (reference), 2 micro-batches, a user reward from a file: a run
    SIGKILLed after step 3 and resumed logs the same metrics (rewards, losses, evals) as an
    uninterrupted one, and writes the adapter, reward.png and summary."""
    (tmp_path / "rw.py").write_text(REWARD_FILE)
    over = {"model.source": tiny_model_dir, "lora.r": 4, "lora.alpha": 8.0, "grpo.num_generations": 4,
            "grpo.num_iterations": 2, "grpo.beta": 0.1, "grpo.max_completion_length": 8, "train.batch_size": 4,
            "train.grad_accum": 2, "train.max_steps": 4, "train.checkpoint_every": 2, "train.eval_every": 2,
            "data.max_eval_examples": 4, "optim.lr": 5e-2, "optim.warmup_ratio": 0.0,
            "grpo.reward_funcs": f"format,{tmp_path / 'rw.py'}:length_reward"}
    cache = tmp_path / "xla_cache"
    ref = _train_cli({**over, "workdir": tmp_path / "ref"}, cache=cache)
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = _train_cli({**over, "workdir": tmp_path / "killed"}, {"QLORA_FAULT_KILL_AT_STEP": "3"}, cache)
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = _train_cli({**over, "workdir": tmp_path / "killed"}, cache=cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr

    timing = ("rollout_seconds", "step_seconds")

    def rows(workdir):
        return [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(workdir / "metrics.jsonl")]

    ref_rows = rows(tmp_path / "ref")
    assert rows(tmp_path / "killed") == ref_rows  # bit-identical floats, evaluations included
    train_rows = [r for r in ref_rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(r["grad_norm"] > 0 and r["kl"] >= 0 for r in train_rows)
    # step 1: the policy is the reference and the rollout policy (up to float rounding between programs);
    # step 2 is the 2nd iteration on the same rollout, with the adapters of step 1
    assert train_rows[0]["kl"] < 1e-6 and train_rows[-1]["kl"] > 1e-6
    assert abs(train_rows[0]["ratio"] - 1) < 1e-5 and abs(train_rows[1]["ratio"] - 1) > 1e-5
    assert train_rows[0]["reward"] == train_rows[1]["reward"]  # mu = 2: one rollout for two steps
    summary = json.loads((tmp_path / "ref/summary.json").read_text())
    assert summary["grpo"]["num_iterations"] == 2 and summary["final_step"] == 4
    assert (tmp_path / "ref/adapter/adapter_model.safetensors").is_file()
    assert (tmp_path / "ref/reward.png").is_file() and (tmp_path / "ref/eval_completions/step_00004.jsonl").is_file()
