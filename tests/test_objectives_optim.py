"""Chunked SFT loss against a direct log-softmax; the schedule against transformers'."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _support import require

from qlora_jax.objectives.logprobs import masked_nll_sum, sequence_logprob, token_nll
from qlora_jax.train.optim import learning_rate_schedule, make_optimizer


def _direct_nll(h, w, t):
    logits = np.einsum("bsd,vd->bsv", h.astype(np.float64), w.astype(np.float64))
    m = logits.max(-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(logits - m).sum(-1))
    picked = np.take_along_axis(logits, t[..., None], -1)[..., 0]
    return lse - picked


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_chunked_nll_equals_direct(chunk):
    rng = np.random.default_rng(0)
    h = rng.standard_normal((3, 17, 32)).astype(np.float32)
    w = rng.standard_normal((101, 32)).astype(np.float32) * 0.3
    t = rng.integers(0, 101, (3, 17)).astype(np.int32)
    mask = (rng.random((3, 17)) < 0.6).astype(np.int32)
    nll = jax.jit(lambda a, b, c: token_nll(a, b, c, chunk_size=chunk))(h, w, t)
    chex.assert_shape(nll, (3, 17))
    np.testing.assert_allclose(np.asarray(nll), _direct_nll(h, w, t), rtol=1e-5, atol=1e-5)
    s, n = masked_nll_sum(h, w, t, mask, chunk_size=chunk)
    assert float(n) == mask.sum()
    np.testing.assert_allclose(float(s), (_direct_nll(h, w, t) * mask).sum(), rtol=1e-5)
    lp = sequence_logprob(h, w, t, mask, chunk_size=chunk)
    np.testing.assert_allclose(np.asarray(lp), -(_direct_nll(h, w, t) * mask).sum(-1), rtol=1e-5)


def test_chunked_gradient_equals_full_logits_gradient_and_saves_memory():
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.standard_normal((2, 64, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4096, 16)) * 0.2, jnp.float32)
    t = jnp.asarray(rng.integers(0, 4096, (2, 64)), jnp.int32)
    mask = jnp.ones((2, 64), jnp.int32)

    def full(h):
        logp = jax.nn.log_softmax(jnp.einsum("bsd,vd->bsv", h, w), -1)
        return -jnp.sum(jnp.take_along_axis(logp, t[..., None], -1))

    def chunked(h):
        return masked_nll_sum(h, w, t, mask, chunk_size=16)[0]

    g_full = jax.grad(full)(h)
    g_chunk = jax.grad(chunked)(h)
    np.testing.assert_allclose(np.asarray(g_chunk), np.asarray(g_full), rtol=1e-4, atol=1e-5)
    mem_full = jax.jit(jax.grad(full)).lower(h).compile().memory_analysis().temp_size_in_bytes
    mem_chunk = jax.jit(jax.grad(chunked)).lower(h).compile().memory_analysis().temp_size_in_bytes
    logits_bytes = 2 * 64 * 4096 * 4
    assert mem_full >= logits_bytes
    assert mem_chunk < logits_bytes / 2, (mem_chunk, mem_full)


def test_schedule_matches_transformers_cosine_with_warmup():
    torch = require("torch")
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    total, ratio, lr = 37, 0.3, 2e-3
    warm = int(np.ceil(total * ratio))
    for name, maker in [("cosine", get_cosine_schedule_with_warmup), ("linear", get_linear_schedule_with_warmup)]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        sched = maker(opt, num_warmup_steps=warm, num_training_steps=total)
        ref = []
        for _ in range(total):
            ref.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        ours = [float(learning_rate_schedule(lr=lr, total_steps=total, warmup_ratio=ratio, schedule=name)(s))
                for s in range(total)]
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-10)


def test_optimizer_is_adamw_after_global_norm_clipping():
    """One step against the closed form: clip to norm 0.3, Adam moments, decoupled decay."""
    tx, _ = make_optimizer(lr=1e-2, total_steps=10, warmup_ratio=0.0, schedule="constant",
                           weight_decay=0.01, max_grad_norm=0.3)
    params = {"a": jnp.asarray([1.0, -2.0]), "b": jnp.asarray([[0.5]])}
    grads = {"a": jnp.asarray([3.0, 4.0]), "b": jnp.asarray([[0.0]])}
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params)
    norm = 5.0
    g = np.asarray([3.0, 4.0]) * 0.3 / norm
    m, v = 0.1 * g, 0.001 * g**2
    mhat, vhat = m / 0.1, v / 0.001
    expect_a = -1e-2 * (mhat / (np.sqrt(vhat) + 1e-8) + 0.01 * np.asarray([1.0, -2.0]))
    np.testing.assert_allclose(np.asarray(updates["a"]), expect_a, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(updates["b"]), -1e-2 * 0.01 * 0.5 * np.ones((1, 1)), rtol=1e-5)


def test_loraplus_steps_equal_peft_loraplus_optimizer():
    """LoRA+ against peft's ``create_loraplus_optimizer`` (torch AdamW, lora_B at lr x ratio) on the
    same adapters and gradients: three steps of clipping + AdamW + decoupled decay, to float32
    rounding; and ratio 0 is the plain optimizer."""
    torch = require("torch")
    peft = require("peft")
    from peft.optimizers import create_loraplus_optimizer

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    lora_a = model.base_model.model[0].lora_A["default"].weight
    lora_b = model.base_model.model[0].lora_B["default"].weight
    with torch.no_grad():
        lora_b.normal_()  # B = 0 at init would hide B's learning rate in the first step
    lr, ratio, wd = 1e-2, 16.0, 0.01
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                    loraplus_weight_decay=wd, eps=1e-8, betas=(0.9, 0.999))
    tx, _ = make_optimizer(lr=lr, total_steps=10, warmup_ratio=0.0, schedule="constant", weight_decay=wd,
                           max_grad_norm=0.3, loraplus_lr_ratio=ratio)
    start_b = lora_b.detach().numpy().copy()
    params = {"proj": {"lora_a": jnp.asarray(lora_a.detach().numpy()), "lora_b": jnp.asarray(start_b)}}
    state = tx.init(params)
    rng = np.random.default_rng(0)
    for _ in range(3):
        ga, gb = rng.normal(size=lora_a.shape).astype(np.float32), rng.normal(size=lora_b.shape).astype(np.float32)
        lora_a.grad, lora_b.grad = torch.from_numpy(ga.copy()), torch.from_numpy(gb.copy())
        torch.nn.utils.clip_grad_norm_([lora_a, lora_b], 0.3)
        opt.step()
        updates, state = tx.update({"proj": {"lora_a": jnp.asarray(ga), "lora_b": jnp.asarray(gb)}}, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    # optax forms Adam's bias correction 1 - 0.999^t in float32 (1.3e-5 relative error at t=1; torch
    # uses Python floats): at B's learning rate of 0.16 that is ~3e-6 after three steps, for plain
    # optax.adamw as much as here. A wrong ratio misses by ~0.1.
    np.testing.assert_allclose(np.asarray(params["proj"]["lora_a"]), lora_a.detach().numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(params["proj"]["lora_b"]), lora_b.detach().numpy(), rtol=0, atol=1e-5)
    assert np.abs(np.asarray(params["proj"]["lora_b"]) - start_b).max() > 0.3  # B moved at lr x 16

    plain, _ = make_optimizer(lr=lr, total_steps=10, warmup_ratio=0.0, schedule="constant", weight_decay=wd,
                              max_grad_norm=0.3, loraplus_lr_ratio=0.0)
    p0 = {"proj": {"lora_a": jnp.ones((2, 6)), "lora_b": jnp.ones((5, 2))}}
    g0 = {"proj": {"lora_a": jnp.full((2, 6), 0.1), "lora_b": jnp.full((5, 2), 0.1)}}
    u_plain, _ = plain.update(g0, plain.init(p0), p0)
    u_plus, _ = tx.update(g0, tx.init(p0), p0)
    np.testing.assert_allclose(np.asarray(u_plus["proj"]["lora_a"]), np.asarray(u_plain["proj"]["lora_a"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(u_plus["proj"]["lora_b"]), ratio * np.asarray(u_plain["proj"]["lora_b"]),
                               rtol=1e-6)


def test_masked_nll_gradient_equals_log_softmax_gradient_and_projects_vocab_twice():
    """Masked, weighted per-token NLL: value and gradient equal autodiff through a full
    log-softmax; the differentiated program holds exactly two [chunk, vocab] matmuls (logits and
    the gradient with respect to the hidden states): no third one recomputing logits."""
    rng = np.random.default_rng(4)
    h = jnp.asarray(rng.standard_normal((3, 21, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((777, 16)) * 0.3, jnp.float32)
    t = jnp.asarray(rng.integers(0, 777, (3, 21)), jnp.int32)
    mask = jnp.asarray(rng.random((3, 21)) < 0.4, jnp.float32)
    weights = jnp.asarray(rng.random((3, 21)), jnp.float32)

    def full(hh):
        logp = jax.nn.log_softmax(jnp.einsum("bsd,vd->bsv", hh, w), -1)
        return -jnp.sum(jnp.take_along_axis(logp, t[..., None], -1)[..., 0] * mask * weights)

    def ours(hh):
        return jnp.sum(token_nll(hh, w, t, mask, chunk_size=8) * weights)

    np.testing.assert_allclose(float(jax.jit(ours)(h)), float(full(h)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(ours))(h)), np.asarray(jax.grad(full)(h)),
                               rtol=1e-4, atol=1e-6)

    def vocab_matmuls(jaxpr) -> int:
        n = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general" and 777 in eqn.invars[0].aval.shape + eqn.invars[1].aval.shape:
                n += 1
            for param in eqn.params.values():  # nested jaxprs: scan/cond bodies, custom_vjp, pjit
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds its Jaxpr
                    if hasattr(sub, "eqns"):
                        n += vocab_matmuls(sub)
        return n

    assert vocab_matmuls(jax.make_jaxpr(jax.value_and_grad(ours))(h).jaxpr) == 2
