"""KTO against trl 1.16.0's own code: losses, logged statistics and gradients on the same log-probs,
the mismatched KL rows token for token, the jit'd step (gradient accumulation included) on a tiny
model's log-probs, the unpaired data format and its errors, and a short run of configs/kto.py.

References: ``trl.KTOTrainer._compute_loss`` run unmodified on a stand-in trainer object
(``object.__new__``, precomputed reference log-probs; the stand-in model returns per-token
log-probs we choose, the policy's as a torch leaf for autograd), and trl's ``_prepare_dataset``
(tokenization, the +1 rotation of completions that makes the KL rows) with its
``DataCollatorForUnpairedPreference``.
"""

from __future__ import annotations

import json
import math
import sys
import types
from collections import defaultdict
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _support import require, write_tiny_llama

torch = require("torch")
trl = require("trl")
datasets = require("datasets")
from trl import KTOTrainer  # noqa: E402
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import kto as kto_config  # noqa: E402
from qlora_jax.data.sources import DataError  # noqa: E402
from qlora_jax.data.unpaired import (  # noqa: E402
    UnpairedBatchIterator,
    prepare_unpaired,
    to_unpaired_examples,
    tokenize_unpaired,
)
from qlora_jax.objectives.kto import KTOObjective, kl_estimate, kto_loss  # noqa: E402

TOL = 1e-6  # float32 on both sides
TRL_NAMES = {"rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected",
             "rewards/margins": "reward_margin", "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected",
             "kl": "kl"}


def _set(c, overrides):
    with c.unlocked():
        for key, value in overrides.items():
            node = c
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return c


# -- trl's loss on log-probs we choose -------------------------------------------------------------


def _trl(objective: KTOObjective, policy, ref, kl_policy, kl_ref, labels):
    """trl's ``_compute_loss`` on one micro-batch: (loss, logged metrics, d loss / d policy log-probs)."""
    n, width = len(labels), 5
    t = object.__new__(KTOTrainer)
    t.accelerator = types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x)
    t.model = types.SimpleNamespace(training=True)
    t.aux_loss_enabled, t.precompute_ref_logps, t._total_train_tokens, t._tp_size = False, True, 0, 1
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t.beta, t.loss_type = objective.beta, objective.loss_type
    t.desirable_weight, t.undesirable_weight = objective.desirable_weight, objective.undesirable_weight
    t.calculate_KL = objective.loss_type == "kto"
    t_policy = torch.tensor(np.asarray(policy, np.float32), requires_grad=True)
    ones = torch.ones(n, width, dtype=torch.long)
    batch = {"label": torch.tensor(np.asarray(labels, bool)), "input_ids": 0 * ones, "attention_mask": ones,
             "completion_mask": ones, "KL_input_ids": ones, "KL_attention_mask": ones, "KL_completion_mask": ones,
             "ref_logps": torch.tensor(np.asarray(ref, np.float32)),
             "ref_KL_logps": torch.tensor(np.asarray(kl_ref, np.float32))}

    def model(input_ids, **kw):  # a sequence's log-prob sits on its first target position, zeros after
        lp = torch.tensor(np.asarray(kl_policy, np.float32)) if int(input_ids[0, 0]) == 1 else t_policy
        zeros = torch.zeros(n, width - 1)
        return types.SimpleNamespace(log_probs=torch.cat([lp[:, None], zeros[:, 1:]], 1), entropy=zeros,
                                     mean_logits=zeros)

    loss = KTOTrainer._compute_loss(t, model, batch, False)
    loss.backward()
    metrics = {k: v[-1] for k, v in t._metrics["train"].items()}
    return float(loss.detach()), metrics, t_policy.grad.numpy()


def _ours(objective: KTOObjective, policy, ref, kl_policy, kl_ref, labels, padding: int):
    """Our loss per row (sum / rows), metrics and gradient, with ``padding`` padding rows appended."""
    pad = np.zeros(padding, np.float32)
    n = len(labels)
    lengths = np.concatenate([np.full(n, 3.0, np.float32), pad])
    policy, ref, kl_policy, kl_ref = (np.concatenate([np.asarray(a, np.float32), pad + 7.0])
                                      for a in (policy, ref, kl_policy, kl_ref))  # padding values are ignored
    desirable = np.concatenate([np.asarray(labels, bool), np.ones(padding, bool)])
    kl = kl_estimate(kl_policy, kl_ref, lengths > 0)

    def loss(p):
        s, stats = objective.sums(p, jnp.asarray(ref), jnp.asarray(desirable), jnp.asarray(lengths), kl)
        return s / stats["examples"], stats

    (value, stats), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(policy))
    chex.assert_shape(grad, (n + padding,))
    chex.assert_type(grad, jnp.float32)
    assert not np.asarray(grad)[n:].any()  # padding rows get no gradient
    return float(value), objective.step_metrics(stats), np.asarray(grad)[:n]


OBJECTIVES = [KTOObjective(beta=0.1), KTOObjective(beta=0.5, desirable_weight=1.33, undesirable_weight=0.7),
              KTOObjective(beta=0.2, loss_type="apo_zero_unpaired", desirable_weight=0.8, undesirable_weight=1.5)]
IDS = ["kto", "kto-weighted", "apo_zero_unpaired-weighted"]


@pytest.mark.parametrize("objective", OBJECTIVES, ids=IDS)
def test_loss_metrics_and_gradients_equal_trl_on_logps(objective):
    rng = np.random.default_rng(3)
    worst = np.zeros(3)  # loss, statistics (relative above 1), gradients
    cases = [(7, 0.6, 2), (7, -0.8, 0), (3, 0.3, 1), (4, 0.2, 0)]  # rows, KL shift (negative: clamped), padding
    for case, (n, shift, padding) in enumerate(cases):
        labels = rng.random(n) < 0.5
        labels[:2] = (True, False)
        if case == 2:
            labels[:] = True  # no undesirable row: trl logs no rewards/rejected, no margin
        if case == 3:
            labels[:] = False
        ref = rng.uniform(-60, -5, n).astype(np.float32)
        policy = (ref + rng.normal(0, 4, n)).astype(np.float32)
        kl_ref = rng.uniform(-80, -20, n).astype(np.float32)
        kl_policy = (kl_ref + shift + rng.normal(0, 0.3, n)).astype(np.float32)
        t_loss, t_metrics, t_grad = _trl(objective, policy, ref, kl_policy, kl_ref, labels)
        loss, metrics, grad = _ours(objective, policy, ref, kl_policy, kl_ref, labels, padding)
        assert metrics["examples"] == n and metrics["desirable"] == labels.sum()
        common = [k for k in TRL_NAMES if k in t_metrics and (k != "kl" or objective.uses_kl)]
        assert {TRL_NAMES[k] for k in common} <= set(metrics), (common, metrics)
        assert ("reward_margin" in metrics) == ("rewards/margins" in t_metrics)
        if objective.uses_kl and shift < 0:
            assert t_metrics["kl"] == 0.0 == metrics["kl"]  # the clamp
        stat_err = max(abs(metrics[TRL_NAMES[k]] - t_metrics[k]) / max(1.0, abs(t_metrics[k])) for k in common)
        errs = [abs(loss - t_loss), stat_err, float(np.abs(grad - t_grad).max())]
        worst = np.maximum(worst, errs)
    print(f"max |ours - trl| on log-probs (loss, statistics, gradients): {worst.tolist()}")
    assert (worst <= TOL).all(), worst


def test_kl_estimate_is_detached_and_weights_scale_each_side():
    pol, ref = jnp.array([-3.0, -5.0]), jnp.array([-4.0, -4.0])
    g = jax.grad(lambda p: kl_estimate(p, ref, jnp.array([True, True])))(pol)
    assert not np.asarray(g).any()
    z = kl_estimate(pol, ref, jnp.array([True, False]))  # the live row only: mean of [1.0]
    assert float(z) == 1.0
    base = kto_loss(pol, ref, jnp.array([True, False]), 0.5, beta=0.3)
    weighted = kto_loss(pol, ref, jnp.array([True, False]), 0.5, beta=0.3, desirable_weight=2.0,
                        undesirable_weight=0.25)
    np.testing.assert_allclose(np.asarray(weighted.losses), np.asarray(base.losses) * [2.0, 0.25], rtol=1e-6)
    # closed form: 1 - sigmoid(beta (r - z)) and 1 - sigmoid(beta (z - r))
    expect = [1 - 1 / (1 + math.exp(-0.3 * (1.0 - 0.5))), 1 - 1 / (1 + math.exp(-0.3 * (0.5 + 1.0)))]
    np.testing.assert_allclose(np.asarray(base.losses), expect, rtol=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        kto_loss(pol, ref, jnp.array([True, False]), 0.0, beta=0.1, loss_type="sigmoid")


# -- the KL rows and batches, token for token against trl ------------------------------------------


@pytest.fixture(scope="module")
def tok():
    from qlora_jax.checkpoints import gguf_tokenizer, resolve_builtin

    return gguf_tokenizer(resolve_builtin("smollm2-135m-instruct"))


def _string_rows():
    return [{"prompt": f"Question {i}: what is {i} plus {3 * i}?",
             "completion": f" It is {4 * i}." + (" I hope this helps!" if i % 2 else ""),
             "label": bool(i % 3)} for i in range(8)]


def test_batches_and_kl_rows_equal_trls(tok):
    """trl tokenizes string rows, rotates the completions by one within chunks of
    per_device_train_batch_size and collates prompt + (KL) completion; our sequential batches of
    the same size hold the same rows, KL rows, completion masks and labels (a short last batch
    included)."""
    rows, batch_size = _string_rows(), 3
    t = object.__new__(KTOTrainer)
    t._tokenizer, t.calculate_KL, t.desirable_weight, t.undesirable_weight = tok, True, 1.0, 1.0
    args = types.SimpleNamespace(dataset_num_proc=None, per_device_train_batch_size=batch_size, max_length=128)
    ds = t._prepare_dataset(datasets.Dataset.from_list(rows), tok, args, "train")
    collator = DataCollatorForUnpairedPreference(pad_token_id=tok.pad_token_id, max_length=128)

    ours, stats = tokenize_unpaired(to_unpaired_examples(rows), tok, max_length=128)
    assert (stats.kept, stats.desirable) == (8, sum(r["label"] for r in rows))
    it = UnpairedBatchIterator(ours, batch_size=batch_size, seq_len=128, shuffle=False, num_epochs=1,
                               pad_to_multiple_of=16, pad_id=tok.pad_token_id)
    compared = 0
    for b, start in zip(it, range(0, len(rows), batch_size)):
        chunk = [ds[i] for i in range(start, min(start + batch_size, len(rows)))]
        ref = collator(chunk)
        chex.assert_equal_shape([b[k] for k in b])
        for r in range(len(chunk)):
            for prefix in ("", "KL_"):
                ours_p = "kl_" if prefix else ""
                n = int(ref[f"{prefix}attention_mask"][r].sum())
                np.testing.assert_array_equal(b[f"{ours_p}input_ids"][r, :n], ref[f"{prefix}input_ids"][r, :n].numpy())
                assert (b[f"{ours_p}segment_ids"][r] > 0).sum() == n
                # our loss mask is target-aligned: position t trains token t + 1
                np.testing.assert_array_equal(b[f"{ours_p}loss_mask"][r, :n - 1],
                                              ref[f"{prefix}completion_mask"][r, 1:n].numpy())
            assert bool(b["desirable"][r, 0]) == bool(ref["label"][r])
            compared += 1
        assert not b["loss_mask"][len(chunk):].any() and not b["kl_loss_mask"][len(chunk):].any()
    assert compared == len(rows)


def test_formats_pairs_and_bad_rows(tok, tmp_path):
    conv = {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}],
            "label": True}
    pair = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
            "rejected": [{"role": "assistant", "content": "Go away"}]}
    (a,) = tokenize_unpaired(to_unpaired_examples([conv]), tok, max_length=64)[0]
    good, bad = tokenize_unpaired(to_unpaired_examples([pair]), tok, max_length=64)[0]  # trl's unpairing
    assert (good.desirable, bad.desirable) == (True, False)
    np.testing.assert_array_equal(a.example.input_ids, good.example.input_ids)
    assert good.prompt_length == bad.prompt_length == a.prompt_length
    np.testing.assert_array_equal(good.example.input_ids[:a.prompt_length], bad.example.input_ids[:a.prompt_length])
    assert tok.decode(good.example.input_ids[good.example.loss_mask > 0]) == "Hello<|im_end|>"
    assert to_unpaired_examples([{**conv, "label": 0}])[0].desirable is False

    path = tmp_path / "kto.jsonl"
    lines = [json.dumps(conv), "", json.dumps(conv), json.dumps({**conv, "label": None}), json.dumps(conv)]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:4: field 'label' missing \(KTO data\)"):
        prepare_unpaired(str(path), tok, max_length=64)
    path.write_text(json.dumps({**conv, "label": 2}) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:1: field 'label' must be true or false, got 2"):
        prepare_unpaired(str(path), tok, max_length=64)
    path.write_text(json.dumps({"prompt": "x", "answer": "y"}) + "\n")
    with pytest.raises(DataError, match="KTO data needs columns 'prompt', 'completion', 'label'"):
        prepare_unpaired(str(path), tok, max_length=64)


# -- config ----------------------------------------------------------------------------------------


def test_config_validates_and_bad_values_name_the_key():
    import re

    from qlora_jax.train.config import ConfigError, RunConfig, validate_config

    rc = RunConfig.from_config(kto_config.get_config())
    assert (rc.objective, rc.kto.loss_type, rc.kto.beta, rc.dpo) == ("kto", "kto", 0.1, None)
    for overrides, message in [
        ({"kto.loss_type": "sigmoid"}, "config.kto.loss_type='sigmoid': must be one of 'kto', 'apo_zero_unpaired'"),
        ({"kto.beta": 0.0}, "config.kto.beta=0.0: must be > 0"),
        ({"kto.undesirable_weight": -1.0}, "config.kto.undesirable_weight=-1.0: must be >= 0"),
        ({"train.batch_size": 1}, "config.train.batch_size=1: KTO's KL estimate pairs each row"),
        ({"kto.reference": "init"}, "config.kto.reference='init' needs config.model.init_from"),
        ({"data.train_on_prompt": True}, "config.data.train_on_prompt: has no effect with objective='kto'"),
        ({"data.pack": True}, "config.data.pack: packing is not supported with objective='kto'"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)) as err:
            validate_config(_set(kto_config.get_config(), overrides))
        assert len(str(err.value).splitlines()) == 2, str(err.value)  # "invalid config:" and the key's line
    validate_config(_set(kto_config.get_config(), {"kto.loss_type": "apo_zero_unpaired", "train.batch_size": 1}))


# -- the jit'd step on a tiny model, against trl on the model's log-probs ---------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama_kto"), tok)


def test_step_with_accumulation_equals_trl_per_micro_batch(tiny_dir, tok):
    """Two micro-batches of 4 rows: the step's loss is the mean of trl's micro-batch losses, each
    with its own KL estimate, on log-probs of the same adapters (policy) and adapters off (reference)."""
    import optax

    from qlora_jax.checkpoints.load import load_model
    from qlora_jax.lora import LoraConfig
    from qlora_jax.objectives.dpo import sequence_logps
    from qlora_jax.objectives.kto import kl_batch
    from qlora_jax.train import loop, sharding

    lora = LoraConfig(r=4, alpha=8, dropout=0.0, init="gaussian", init_std=0.05, targets=("q_proj", "v_proj"))
    model, _ = load_model(tiny_dir, quantize=None, lora=lora, with_tokenizer=False)
    from flax import nnx

    from qlora_jax.lora import LoRAParam
    key = jax.random.key(1)
    for path, var in nnx.iter_graph(model):  # B != 0: the policy differs from the reference
        if isinstance(var, LoRAParam) and path[-1] == "lora_b":
            key, sub = jax.random.split(key)
            var.value = 0.3 * jax.random.normal(sub, var.value.shape, var.value.dtype)
    rows, _ = prepare_unpaired(str(REPO / "data/kto_demo/eval.jsonl"), tok, max_length=128)
    it = UnpairedBatchIterator(rows[:8], batch_size=4, seq_len=128, shuffle=False, pad_to_multiple_of=16,
                               pad_id=tok.pad_token_id)
    micro = [next(it), next(it)]
    objective = KTOObjective(beta=0.5, desirable_weight=1.2, undesirable_weight=0.9)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    fns, lora_state, rest, opt = loop.make_step_fns(model, optax.sgd(0.0), mesh, objective=objective)
    graphdef = fns.graphdef

    logps = jax.jit(lambda lo, b, on: sequence_logps(graphdef, lo, rest, b, lora_enabled=on), static_argnums=2)
    t_losses, t_kls = [], []
    for b in micro:
        kb = kl_batch(b)
        arrays = [np.asarray(logps(lora_state, x, on)) for x, on in ((b, True), (b, False), (kb, True), (kb, False))]
        t_loss, t_metrics, _ = _trl(objective, *arrays, b["desirable"][:, 0] > 0)
        t_losses.append(t_loss)
        t_kls.append(t_metrics["kl"])
    assert max(t_kls) > 0  # the KL term is active
    stacked = loop.stack_microbatches(micro, tok.pad_token_id)
    _, _, m = fns.train_step(lora_state, opt, rest, stacked, jax.random.key_data(jax.random.key(0)))
    assert float(m["examples"]) == 8 and float(m["batches"]) == 2
    err = abs(float(m["loss"]) - np.mean(t_losses))
    kl_err = abs(float(m["kl"]) / 2 - np.mean(t_kls))
    print(f"step vs trl per micro-batch: |loss| {err:.2e}, |kl| {kl_err:.2e}")
    assert err < 1e-5 and kl_err < 1e-4, (float(m["loss"]), t_losses, float(m["kl"]), t_kls)


# -- the trainer end to end ------------------------------------------------------------------------


def test_kto_config_trains_on_the_demo_set(tiny_dir, tmp_path):
    """configs/kto.py on the shipped demo set, a few steps on a tiny model: finite losses, trl's
    statistics in metrics.jsonl, held-out metrics before and after, the adapter exported."""
    from qlora_jax.train.metrics import read_metrics
    from qlora_jax.train.trainer import run

    cfg = _set(kto_config.get_config(), {
        "workdir": str(tmp_path / "run"), "model.source": str(tiny_dir), "train.max_steps": 3,
        "train.batch_size": 4, "train.eval_every": 0, "train.checkpoint_every": 3, "train.early_stopping_patience": 0,
        "data.max_eval_examples": 8, "data.pad_to_multiple_of": 128, "lora.r": 4, "lora.alpha": 8.0,
        "lora.dropout": 0.0, "lora.targets": "q_proj,v_proj", "optim.lr": 1e-2, "model.quantize": "none",
        "model.remat": "none"})
    result = run(cfg)
    assert result["final_step"] == 3 and result["objective"] == "kto"
    assert result["kto"]["loss_type"] == "kto" and result["reference"] == "adapters off"
    rows = [r for r in read_metrics(tmp_path / "run/metrics.jsonl") if "loss" in r]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
    for r in rows:
        assert r["examples"] == 4 and r["kl"] >= 0
        assert all(np.isfinite(r[k]) for k in ("label_accuracy", "kl") + tuple(
            k for k in ("rewards_chosen", "rewards_rejected", "logps_chosen", "logps_rejected") if k in r))
    before, after = result["eval_before"], result["eval_after"]
    for ev in (before, after):
        assert {"loss", "label_accuracy", "kl", "rewards_chosen", "rewards_rejected", "reward_margin",
                "reward_accuracy", "logp_accuracy"} <= set(ev)
        assert ev["examples"] == 8 and ev["pairs"] == 4  # the eval file's first 4 pairs, both sides
    assert abs(before["loss"] - 0.5) < 1e-4  # policy = reference at init: every row loses 1 - sigmoid(0)
    assert after["loss"] != before["loss"]
    assert (tmp_path / "run/adapter/adapter_model.safetensors").is_file()

