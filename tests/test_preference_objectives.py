"""ORPO, CPO and SimPO against trl 1.16.0's own code: losses, logged rewards and statistics, and
gradients, then one short ORPO run of the trainer.

References: ``trl.experimental.orpo.ORPOTrainer`` and ``trl.experimental.cpo.CPOTrainer``, whose
``get_batch_loss_metrics`` (and ``concatenated_forward``: masking, length averaging, the chosen
NLL) run unmodified on a stand-in trainer object (``object.__new__``, no model loading); the
stand-in model returns logits we choose. Gradients are torch autograd's of trl's loss against
``jax.grad`` of ours, in float32 on both sides.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _support import require, write_tiny_llama

torch = require("torch")
trl = require("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qlora_jax.objectives.preference import (  # noqa: E402
    CPOObjective,
    ORPOObjective,
    RowTerms,
    cpo_loss,
    log1mexp,
    orpo_loss,
)

TOL = 1e-6  # float32 on both sides

# The rewards/metrics trl logs and the names our step_metrics gives them.
TRL_NAMES = {"rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected",
             "rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
             "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected", "nll_loss": "nll_loss",
             "log_odds_ratio": "log_odds_ratio", "log_odds_chosen": "log_odds_chosen"}


def _stand_in(cls, **attrs):
    """A trl trainer object without ``__init__`` (no model, no dataset): just what the loss reads."""
    t = object.__new__(cls)
    t.accelerator = types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x)
    t.aux_loss_enabled, t.is_encoder_decoder, t.padding_value, t.pad_token_id = False, False, 0, 0
    for k, v in attrs.items():
        setattr(t, k, v)
    return t


def _trainer(objective):
    if isinstance(objective, ORPOObjective):
        return _stand_in(ORPOTrainer, beta=objective.beta)
    o = objective
    return _stand_in(CPOTrainer, beta=o.beta, loss_type=o.loss_type, label_smoothing=o.label_smoothing,
                     simpo_gamma=o.simpo_gamma, cpo_alpha=o.cpo_alpha, alpha=o.alpha)


def _metric_err(ours: dict, trl_metrics: dict) -> float:
    """The largest difference of a logged statistic, relative for values above 1 in magnitude."""
    return max(abs(ours[ours_name] - trl_metrics[name]) / max(1.0, abs(trl_metrics[name]))
               for name, ours_name in TRL_NAMES.items() if name in trl_metrics and ours_name in ours)


OBJECTIVES = [
    ORPOObjective(beta=0.1), ORPOObjective(beta=1.0),
    CPOObjective(beta=0.1, loss_type="sigmoid"), CPOObjective(beta=0.1, loss_type="sigmoid", label_smoothing=0.2),
    CPOObjective(beta=0.5, loss_type="hinge"), CPOObjective(beta=0.1, loss_type="ipo"),
    CPOObjective(beta=2.0, loss_type="simpo", simpo_gamma=0.5, cpo_alpha=0.0),  # SimPO
    CPOObjective(beta=2.0, loss_type="simpo", simpo_gamma=1.0, cpo_alpha=0.5, label_smoothing=0.1),  # CPO-SimPO
    CPOObjective(beta=2.0, loss_type="simpo", simpo_gamma=0.5, cpo_alpha=0.0, alpha=0.25),  # AlphaPO
]
IDS = ["orpo-0.1", "orpo-1", "cpo-sigmoid", "cpo-sigmoid-smooth", "cpo-hinge", "cpo-ipo", "simpo", "cpo-simpo",
       "alphapo"]


# -- on sequence log-probs -------------------------------------------------------------------------


def _random_rows(rng, pairs: int, padding_pairs: int):
    """Row terms of ``pairs`` live pairs then ``padding_pairs`` padding pairs (no completion)."""
    lengths = rng.integers(1, 40, 2 * pairs).astype(np.float32)
    lengths[:2] = 1.0  # a one-token completion on each side
    avg = rng.uniform(-3.0, -0.02, 2 * pairs).astype(np.float32)
    sums = (avg * lengths).astype(np.float32)
    nll_tokens = np.where(np.arange(2 * pairs) % 2 == 0, lengths + rng.integers(0, 20, 2 * pairs), 0)
    nll = (rng.uniform(0.1, 3.0, 2 * pairs) * nll_tokens).astype(np.float32)
    pad = np.zeros(2 * padding_pairs, np.float32)
    return tuple(np.concatenate([a.astype(np.float32), pad]) for a in (sums, lengths, nll, nll_tokens))


def _ours_on_rows(objective, sums, lengths, nll, nll_tokens):
    def loss(sums, nll):
        s, stats = objective.pair_sums(RowTerms(sums, jnp.asarray(lengths), nll, jnp.asarray(nll_tokens)))
        return s / stats["pairs"], stats

    (value, stats), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(jnp.asarray(sums),
                                                                                  jnp.asarray(nll))
    return float(value), objective.step_metrics(stats), [np.asarray(g) for g in grads]


def _trl_on_rows(objective, sums, lengths, nll, nll_tokens, pairs):
    """trl's ``get_batch_loss_metrics`` with a ``concatenated_forward`` that returns the log-probs
    (summed or averaged, as trl would pass them) and the chosen NLL (a token mean) of the live rows."""
    n = 2 * pairs
    t_sums = torch.tensor(sums[:n], requires_grad=True)
    t_nll = torch.tensor(nll[:n], requires_grad=True)
    average = objective.average
    logps = t_sums / torch.tensor(lengths[:n]) if average else t_sums
    nll_mean = t_nll.sum() / float(nll_tokens[:n].sum())
    dummy = torch.zeros(pairs, 3, 5)
    trainer = _trainer(objective)
    trainer.concatenated_forward = lambda model, batch: (logps[0::2], logps[1::2], dummy, dummy, nll_mean)
    if isinstance(objective, CPOObjective) and objective.cpo_alpha == 0:  # trl skips the NLL then
        trainer.concatenated_forward = lambda model, batch: (logps[0::2], logps[1::2], dummy, dummy,
                                                             torch.tensor(0.0))
    loss, metrics = type(trainer).get_batch_loss_metrics(trainer, None, None)
    loss.backward()
    g_sums = t_sums.grad.numpy()
    g_nll = t_nll.grad.numpy() if t_nll.grad is not None else np.zeros(n, np.float32)
    return float(loss.detach()), metrics, [g_sums, g_nll]


@pytest.mark.parametrize("objective", OBJECTIVES, ids=IDS)
def test_losses_metrics_and_gradients_equal_trl_on_logps(objective):
    rng = np.random.default_rng(11)
    worst = np.zeros(3)  # loss, statistics (relative above 1), gradients
    for pairs, padding in ((1, 0), (7, 3)):
        rows = _random_rows(rng, pairs, padding)
        loss, metrics, grads = _ours_on_rows(objective, *rows)
        t_loss, t_metrics, t_grads = _trl_on_rows(objective, *rows, pairs)
        assert metrics["pairs"] == pairs  # padding pairs are not counted
        assert set(TRL_NAMES[k] for k in t_metrics if k in TRL_NAMES) - {"nll_loss"} <= set(metrics)
        for g in grads:
            chex.assert_shape(g, (2 * (pairs + padding),))
            assert not g[2 * pairs:].any()  # padding rows get no gradient
        g_err = max(float(np.abs(g[:2 * pairs] - t).max()) for g, t in zip(grads, t_grads))
        errs = [abs(loss - t_loss) / max(1.0, abs(t_loss)), _metric_err(metrics, t_metrics), g_err]
        worst = np.maximum(worst, errs)
    print(f"max |ours - trl| on log-probs (loss, statistics, gradients): {worst.tolist()}")
    assert (worst <= TOL).all(), worst


def test_pure_functions_and_edge_cases():
    w, l = jnp.array([-0.5, -2.0, -1e-3]), jnp.array([-0.9, -0.1, -5.0])  # noqa: E741
    out = orpo_loss(w, l, beta=0.1)
    chex.assert_shape(out, [(3,)] * 5)
    t = _stand_in(ORPOTrainer, beta=0.1).odds_ratio_loss(torch.tensor(np.asarray(w)), torch.tensor(np.asarray(l)))
    np.testing.assert_allclose(np.asarray(-out.losses), t[0].numpy(), atol=1e-7)
    np.testing.assert_allclose(float(jnp.mean(out.log_odds)), float(t[4]), atol=1e-6)
    # log1mexp: both of trl's branches, and a finite gradient where trl's is -inf / NaN.
    x = jnp.array([-30.0, -1.0, -0.6931, -0.3, -1e-6])
    from trl.experimental.orpo.orpo_trainer import log1mexp as trl_log1mexp
    np.testing.assert_allclose(np.asarray(log1mexp(x)), trl_log1mexp(torch.tensor(np.asarray(x))).numpy(), rtol=1e-6)
    g = jax.grad(lambda v: jnp.sum(orpo_loss(v, jnp.array([-1.0]), beta=0.1).losses))(jnp.array([0.0]))
    assert np.isfinite(np.asarray(g)).all()
    # SimPO at gamma = 0 is CPO-sigmoid on averaged log-probs; a zero margin gives log 2.
    a = cpo_loss(w, w, beta=2.0, loss_type="simpo", simpo_gamma=0.0)
    np.testing.assert_allclose(np.asarray(a.losses), np.log(2.0), rtol=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        cpo_loss(w, l, beta=0.1, loss_type="kto")


# -- from hidden states: trl's masking, length averaging and NLL on the same logits ----------------


def _pair_batch(rng, n_pairs: int, length: int, vocab: int):
    """Our interleaved batch (plus one padding pair) and trl's chosen/rejected tensors, same tokens."""
    from qlora_jax.data.preference import TokenizedPair, collate_pairs
    from qlora_jax.data.tokenize import TokenizedExample

    def side(prompt, n):
        ids = np.concatenate([prompt, rng.integers(1, vocab, n)]).astype(np.int32)
        mask = np.concatenate([np.zeros(len(prompt)), np.ones(n)]).astype(np.int8)
        return TokenizedExample(ids, mask, mask)

    pairs = []
    for i in range(n_pairs):
        prompt = rng.integers(1, vocab, int(rng.integers(2, 8)))
        n_c, n_r = (1, 3) if i == 0 else rng.integers(1, length - len(prompt), 2)
        pairs.append(TokenizedPair(side(prompt, int(n_c)), side(prompt, int(n_r))))
    ours = collate_pairs(pairs, range(n_pairs), num_pairs=n_pairs + 1, length=length, pad_id=0)

    def trl_side(name):
        ids = torch.zeros(n_pairs, length, dtype=torch.long)
        attention = torch.zeros(n_pairs, length, dtype=torch.long)
        labels = torch.full((n_pairs, length), -100, dtype=torch.long)
        for i, p in enumerate(pairs):
            s = getattr(p, name)
            n = len(s)
            ids[i, :n] = torch.from_numpy(s.input_ids.astype(np.int64))
            attention[i, :n] = 1
            labels[i, :n] = torch.where(torch.from_numpy(s.loss_mask) > 0, ids[i, :n], -100)
        return {f"{name}_input_ids": ids, f"{name}_attention_mask": attention, f"{name}_labels": labels}

    return ours, {**trl_side("chosen"), **trl_side("rejected")}


@pytest.mark.parametrize("objective", [OBJECTIVES[0], OBJECTIVES[2], OBJECTIVES[6], OBJECTIVES[7]],
                         ids=["orpo", "cpo-sigmoid", "simpo", "cpo-simpo"])
def test_from_hidden_states_equal_trl_concatenated_forward(objective):
    """The NLL term (ORPO: chosen prompt + completion; CPO: chosen completion), the averaging and
    the completion masks, against trl's ``concatenated_forward`` on logits = h @ w.T."""
    rng = np.random.default_rng(5)
    n_pairs, length, vocab, d = 5, 24, 50, 16
    batch, trl_batch = _pair_batch(rng, n_pairs, length, vocab)
    h = (rng.standard_normal((2 * n_pairs + 2, length, d)) * 0.7).astype(np.float32)
    w = rng.standard_normal((vocab, d)).astype(np.float32)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}

    def ours(hh):
        s, stats = objective.sums_from_hidden(hh, jnp.asarray(w), jb)
        return s / stats["pairs"], stats

    (loss, stats), g = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(h))
    metrics = objective.step_metrics(stats)

    order = np.concatenate([np.arange(0, 2 * n_pairs, 2), np.arange(1, 2 * n_pairs, 2)])  # trl: chosen, then rejected
    t_h = torch.tensor(h[order], requires_grad=True)
    t_w = torch.tensor(w)
    model = lambda input_ids, **kw: types.SimpleNamespace(logits=t_h @ t_w.T)  # noqa: E731
    trainer = _trainer(objective)
    t_loss, t_metrics = type(trainer).get_batch_loss_metrics(trainer, model, trl_batch)
    t_loss.backward()
    t_g = np.zeros_like(h)
    t_g[order] = t_h.grad.numpy()

    t_loss = t_loss.detach()
    errs = [abs(float(loss) - float(t_loss)) / max(1.0, abs(float(t_loss))), _metric_err(metrics, t_metrics),
            float(np.abs(np.asarray(g) - t_g).max())]
    print(f"max |ours - trl| from hidden states (loss, statistics, gradients): {errs}")
    assert max(errs) <= TOL, (errs, metrics, t_metrics)
    assert not np.asarray(g)[2 * n_pairs:].any()  # the padding pair


# -- config ----------------------------------------------------------------------------------------


def test_configs_validate_and_bad_values_name_the_key():
    import re

    from configs import dpo as dpo_config
    from configs import orpo as orpo_config
    from configs import simpo as simpo_config
    from qlora_jax.train.config import ConfigError, RunConfig, validate_config

    rc = RunConfig.from_config(orpo_config.get_config())
    assert rc.orpo.beta == 0.1 and rc.cpo is None and rc.data.train_on_prompt
    rc = RunConfig.from_config(simpo_config.get_config())
    assert (rc.cpo.loss_type, rc.cpo.cpo_alpha, rc.orpo) == ("simpo", 0.0, None)

    def bad(config, overrides, message):
        c = config.get_config()
        with c.unlocked():
            for key, value in overrides.items():
                section, _, leaf = key.rpartition(".")
                (c[section] if section else c)[leaf] = value
        with pytest.raises(ConfigError, match=re.escape(message)) as err:
            validate_config(c)
        assert len(str(err.value).splitlines()) == 2  # "invalid config:" and one line for the key

    bad(orpo_config, {"orpo.beta": 0.0}, "config.orpo.beta=0.0: must be > 0")
    bad(orpo_config, {"data.pack": True}, "config.data.pack: packing is not supported with objective='orpo'")
    bad(simpo_config, {"cpo.loss_type": "kto"}, "config.cpo.loss_type='kto': must be one of")
    bad(simpo_config, {"cpo.cpo_alpha": -1.0}, "config.cpo.cpo_alpha=-1.0: must be >= 0")
    bad(simpo_config, {"cpo.loss_type": "hinge", "cpo.label_smoothing": 0.1},
        "config.cpo.label_smoothing=0.1 has no effect with loss_type='hinge'")
    bad(simpo_config, {"cpo.label_smoothing": 0.5}, "config.cpo.label_smoothing=0.5: must be in [0, 0.5)")
    bad(dpo_config, {"objective": "orpo"}, "config.objective='orpo' needs a config.orpo section (beta)")
    bad(dpo_config, {"data.train_on_prompt": True}, "config.data.train_on_prompt: has no effect with objective='dpo'")


# -- the step pays for one forward ----------------------------------------------------------------


def _count_forwards(monkeypatch, module, objective, model, batch):
    import optax

    from qlora_jax.train import loop, sharding

    calls = []
    real = module.forward
    monkeypatch.setattr(module, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    fns, lora, rest, opt = loop.make_step_fns(model, optax.sgd(1e-3), mesh, objective=objective)
    key = jax.random.key_data(jax.random.key(0))
    args = (lora, opt, rest, loop.stack_microbatches([batch], 0), key)
    fns.train_step.lower(*args, *((lora,) if objective.frozen_adapters else ()))  # trace only
    return len(calls)


def test_reference_free_step_runs_one_forward(monkeypatch, tok, tiny_dir):
    from qlora_jax.checkpoints.load import load_model
    from qlora_jax.lora import LoraConfig
    from qlora_jax.objectives import dpo, preference

    model, _ = load_model(tiny_dir, quantize=None, lora=LoraConfig(r=2, alpha=4.0, targets=("q_proj",)),
                          with_tokenizer=False)
    batch, _ = _pair_batch(np.random.default_rng(0), 2, 16, 100)
    assert _count_forwards(monkeypatch, preference, ORPOObjective(), model, batch) == 1
    assert _count_forwards(monkeypatch, dpo, dpo.DPOObjective(beta=0.1), model, batch) == 2  # policy + reference


# -- the trainer end to end ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    from qlora_jax.checkpoints import gguf_tokenizer, resolve_builtin

    return gguf_tokenizer(resolve_builtin("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama_orpo"), tok)


def _tiny_orpo_run(tiny_dir, workdir, **extra):
    """configs/orpo.py on the tiny model: 3 steps, no evaluation during the run (``extra`` overrides)."""
    from configs import orpo as orpo_config
    from qlora_jax.train.trainer import run

    cfg = orpo_config.get_config()
    overrides = {"workdir": str(workdir), "model.source": str(tiny_dir), "train.max_steps": 3,
                 "train.batch_size": 2, "train.eval_every": 0, "train.checkpoint_every": 3,
                 "train.early_stopping_patience": 0, "data.max_eval_examples": 4, "data.pad_to_multiple_of": 128,
                 "lora.r": 4, "lora.alpha": 8.0, "lora.dropout": 0.0, "lora.targets": "q_proj,v_proj",
                 "optim.lr": 1e-2, "model.quantize": "none", "model.remat": "none", **extra}  # compiles fast
    with cfg.unlocked():
        for key, value in overrides.items():
            node = cfg
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return run(cfg)


def test_orpo_trains_through_the_trainer(tiny_dir, tmp_path):
    """Three ORPO steps of the real trainer: finite losses, trl's metric names in metrics.jsonl,
    held-out reward accuracy / margin before and after, the adapter exported."""
    from qlora_jax.train.metrics import read_metrics

    result = _tiny_orpo_run(tiny_dir, tmp_path / "run")
    assert result["final_step"] == 3 and result["objective"] == "orpo"
    rows = [r for r in read_metrics(tmp_path / "run/metrics.jsonl") if "loss" in r]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
    for name in ("reward_accuracy", "rewards_chosen", "rewards_rejected", "reward_margin", "logps_chosen",
                 "logps_rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"):
        assert all(np.isfinite(r[name]) for r in rows), name
    before, after = result["eval_before"], result["eval_after"]
    for ev in (before, after):
        assert {"loss", "reward_accuracy", "reward_margin", "nll_loss", "log_odds_ratio"} <= set(ev)
        assert ev["examples"] == 4
    assert after["loss"] != before["loss"]
    assert (tmp_path / "run/adapter/adapter_model.safetensors").is_file()


def test_best_adapter_must_beat_the_untrained_model(tiny_dir, tmp_path):
    """Without a reference model the untrained policy's rewards already rank pairs, so the evaluation
    before step 1 takes part in choosing the best adapter: a run whose later evaluations do not beat
    it (here lr 0, so they equal it) keeps the starting adapters (B = 0) as ``best_adapter``."""
    from safetensors.numpy import load_file

    result = _tiny_orpo_run(tiny_dir, tmp_path / "run", **{"train.max_steps": 1, "train.eval_every": 1,
                                                           "optim.lr": 0.0})
    before, after = result["eval_before"], result["eval_after"]
    assert after["reward_accuracy"] == before["reward_accuracy"]
    assert result["best"]["step"] == 0 and result["best"]["eval_reward_accuracy"] == before["reward_accuracy"]
    tensors = load_file(tmp_path / "run/best_adapter/adapter_model.safetensors")
    lora_b = [v for k, v in tensors.items() if "lora_B" in k]
    assert lora_b and all(not np.any(v) for v in lora_b)
