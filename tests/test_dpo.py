"""DPO: losses against trl's own computation, sequence log-probs against transformers, the
reference policy (adapters off = the base model; frozen starting adapters), training signal, early
stopping with the best adapter kept, and SIGKILL + resume through the CLI.

References: trl 1.16.0 ``DPOTrainer._compute_loss`` (called on a stand-in trainer whose "model"
returns chosen log-probs we choose), transformers' PyTorch LLaMA, peft's ``PeftModel``, a model
loaded without adapters, and an uninterrupted run.
"""

from __future__ import annotations

import json
import math
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
import optax
import pytest
from _support import require

torch = require("torch")
transformers = require("transformers")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import dpo as dpo_config  # noqa: E402
from configs import sft as sft_config  # noqa: E402
from qlora_jax.checkpoints import gguf_tokenizer, resolve_builtin  # noqa: E402
from qlora_jax.checkpoints.load import load_model  # noqa: E402
from qlora_jax.data.preference import (  # noqa: E402
    PreferenceBatchIterator,
    collate_pairs,
    prepare_preference,
    to_preference_examples,
    tokenize_pairs,
)
from qlora_jax.data.tokenize import TruncationWarning  # noqa: E402
from qlora_jax.lora import LoraConfig  # noqa: E402
from qlora_jax.objectives.dpo import DPOObjective, dpo_loss, reward_accuracy, sequence_logps  # noqa: E402  # noqa: E402
from qlora_jax.objectives.logprobs import sequence_logprob  # noqa: E402
from qlora_jax.train import loop, sharding  # noqa: E402
from qlora_jax.train.evaluation import EarlyStopping  # noqa: E402
from qlora_jax.train.metrics import read_metrics  # noqa: E402

LOG2 = math.log(2.0)
DEMO = REPO / "data/dpo_demo"


@pytest.fixture(scope="module")
def tok():
    return gguf_tokenizer(resolve_builtin("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tok) -> Path:
    """A 2-layer random LLaMA (tied embeddings) saved by transformers, with SmolLM2's tokenizer."""
    d = tmp_path_factory.mktemp("tiny_llama_dpo")
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _randomize_b(model, seed=1, scale=0.05):
    """B starts at zero (adapters = identity); give it values so adapters change the model."""
    for view in model.iter_linears():
        b = view.linear.lora_b.get_value()
        view.linear.lora_b.set_value(jax.random.normal(jax.random.key(seed), b.shape, b.dtype) * scale)


# -- losses vs trl -----------------------------------------------------------------------------------


def _trl_loss(loss_type, beta, eps, pc, pr, rc, rr, n_chosen, n_rejected):
    """trl 1.16.0's DPO loss and logged metrics for one batch of pairs, through ``_compute_loss``.

    The stand-in model returns per-token log-probs whose row sums are the given sequence log-probs;
    the completion mask has ``n`` completion tokens per row (used by "ipo"); reference log-probs
    are passed as precomputed, as with ``precompute_ref_log_probs=True``.
    """
    from trl import DPOTrainer

    b = len(pc)
    length = int(max(n_chosen.max(), n_rejected.max())) + 2
    completion_mask = torch.zeros(2 * b, length, dtype=torch.long)
    for row, n in enumerate(np.concatenate([n_chosen, n_rejected])):
        completion_mask[row, 1:1 + int(n)] = 1
    log_probs = torch.zeros(2 * b, length - 1, dtype=torch.float64)
    log_probs[:, 0] = torch.from_numpy(np.concatenate([pc, pr]))
    outputs = types.SimpleNamespace(
        log_probs=log_probs, entropy=torch.zeros(2 * b, length - 1), mean_logits=torch.zeros(2 * b, length - 1),
        is_top1=torch.zeros(2 * b, length - 1, dtype=torch.bool))

    class StandInModel:
        training = True

        def __call__(self, **kwargs):
            return outputs

    accelerator = types.SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = types.SimpleNamespace(
        model=StandInModel(), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=eps, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.ones(2 * b, length, dtype=torch.long), "attention_mask": torch.ones(2 * b, length),
              "completion_mask": completion_mask, "ref_chosen_logps": torch.from_numpy(rc),
              "ref_rejected_logps": torch.from_numpy(rr)}
    loss = DPOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("loss_type,beta,eps", [
    ("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("robust", 0.1, 0.0), ("robust", 0.1, 0.2),
    ("ipo", 0.1, 0.0), ("ipo", 0.5, 0.0), ("hinge", 0.1, 0.0), ("hinge", 2.0, 0.0)])
def test_losses_equal_trl(loss_type, beta, eps):
    rng = np.random.default_rng(7)
    for b in (1, 6):  # single pairs check per-pair values; a batch checks the mean and the metrics
        pc, pr, rc, rr = (rng.normal(-40, 12, b) for _ in range(4))
        n_chosen, n_rejected = rng.integers(1, 30, b), rng.integers(1, 30, b)
        ours = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps,
                        chosen_lengths=n_chosen, rejected_lengths=n_rejected)
        loss, logged = _trl_loss(loss_type, beta, eps, pc, pr, rc, rr, n_chosen, n_rejected)
        np.testing.assert_allclose(float(jnp.mean(ours.losses)), loss, rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(float(jnp.mean(ours.chosen_rewards)), logged["rewards/chosen"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(float(jnp.mean(ours.rejected_rewards)), logged["rewards/rejected"], rtol=1e-5,
                                   atol=1e-5)
        margins = ours.chosen_rewards - ours.rejected_rewards
        np.testing.assert_allclose(float(jnp.mean(margins)), logged["rewards/margins"], rtol=1e-5, atol=1e-5)
        assert float(reward_accuracy(ours.chosen_rewards, ours.rejected_rewards)) == logged["rewards/accuracies"]


def test_zero_delta_gives_log2_and_ties_are_not_accurate():
    x = np.array([-12.0, -30.0, -5.5])
    out = dpo_loss(x, x - 3, x, x - 3, beta=0.1)
    np.testing.assert_allclose(np.asarray(out.losses), LOG2, rtol=1e-7)
    assert float(reward_accuracy(out.chosen_rewards, out.rejected_rewards)) == 0.0
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="ipo")


@pytest.mark.parametrize("chunk", [5, 512])
def test_sequence_logprob_skips_unmasked_chunks_exactly(chunk):
    """The masked-first, chunk-skipping sequence log-prob and its gradient equal the dense formula."""
    from qlora_jax.objectives.logprobs import token_nll

    rng = np.random.default_rng(3)
    h = rng.standard_normal((4, 13, 16)).astype(np.float32)
    w = rng.standard_normal((50, 16)).astype(np.float32) * 0.3
    t = rng.integers(0, 50, (4, 13)).astype(np.int32)
    mask = np.zeros((4, 13), np.int32)
    mask[0, 9:12], mask[1, 4:6], mask[3, 1:13] = 1, 1, 1  # row 2: no completion at all

    def dense(hh):
        return -jnp.sum(token_nll(hh, w, t) * mask, -1)

    def ours(hh):
        return sequence_logprob(hh, w, t, mask, chunk_size=chunk)

    np.testing.assert_allclose(np.asarray(jax.jit(ours)(h)), np.asarray(dense(h)), rtol=1e-6, atol=1e-5)
    weights = jnp.arange(1.0, 5.0)
    g_ours = jax.grad(lambda hh: jnp.sum(ours(hh) * weights))(h)
    g_dense = jax.grad(lambda hh: jnp.sum(dense(hh) * weights))(h)
    np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_dense), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(g_ours[2]).max()) == 0.0


# -- data --------------------------------------------------------------------------------------------


def test_preference_formats_share_the_prompt_and_mask_only_answers(tok):
    msgs = [{"role": "user", "content": "Colour of the sky?"}]
    rows = [
        {"prompt": msgs, "chosen": [{"role": "assistant", "content": "Blue."}],
         "rejected": [{"role": "assistant", "content": "Green, obviously."}]},
        {"chosen": msgs + [{"role": "assistant", "content": "Blue."}],  # implicit prompt (full conversations)
         "rejected": msgs + [{"role": "assistant", "content": "Green, obviously."}]},
        {"prompt": "Colour of the sky?", "chosen": msgs + [{"role": "assistant", "content": "Blue."}],  # hub style
         "rejected": msgs + [{"role": "assistant", "content": "Green, obviously."}]},
    ]
    pairs, stats = tokenize_pairs(to_preference_examples(rows), tok, max_length=128)
    assert stats.kept == 3 and stats.truncated == 0
    for p in pairs:  # all three spellings give the same token ids
        np.testing.assert_array_equal(p.chosen.input_ids, pairs[0].chosen.input_ids)
        np.testing.assert_array_equal(p.rejected.input_ids, pairs[0].rejected.input_ids)
    p = pairs[0]
    start = int(np.argmax(p.chosen.loss_mask))
    assert start == int(np.argmax(p.rejected.loss_mask))
    np.testing.assert_array_equal(p.chosen.input_ids[:start], p.rejected.input_ids[:start])  # shared prompt
    assert tok.decode(p.chosen.input_ids[:start]).endswith("<|im_start|>assistant\n")
    assert tok.decode(p.chosen.input_ids[p.chosen.loss_mask == 1]) == "Blue.<|im_end|>"
    assert tok.decode(p.rejected.input_ids[p.rejected.loss_mask == 1]) == "Green, obviously.<|im_end|>"

    # Strings (TRL "standard"): tokenizer(prompt) + answer + EOS; the implicit-prompt split keeps the
    # space with the answers, as trl.extract_prompt does.
    text = [{"prompt": "Q: sky colour?\nA:", "chosen": " blue", "rejected": " green"},
            {"chosen": "Q: sky colour?\nA: blue", "rejected": "Q: sky colour?\nA: green"}]
    (a, b), _ = tokenize_pairs(to_preference_examples(text), tok, max_length=64)
    np.testing.assert_array_equal(a.chosen.input_ids, b.chosen.input_ids)
    assert tok.decode(a.chosen.input_ids[a.chosen.loss_mask == 1]) == " blue" + tok.eos_token

    # One forward computes both sides: rows interleave chosen and rejected.
    batch = collate_pairs(pairs, [0, 1], num_pairs=3, length=64, pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape == (6, 64)
    np.testing.assert_array_equal(batch["input_ids"][0, :len(p.chosen)], p.chosen.input_ids)
    np.testing.assert_array_equal(batch["input_ids"][1, :len(p.rejected)], p.rejected.input_ids)
    np.testing.assert_array_equal(batch["loss_mask"][1, :len(p.rejected) - 1], p.rejected.loss_mask[1:])
    assert batch["segment_ids"][4:].sum() == 0  # the missing third pair is padding


def test_truncation_is_counted_and_bad_rows_are_named(tok):
    long = "word " * 80
    rows = [{"prompt": "Say it.", "chosen": "ok", "rejected": long},  # rejected side cut: kept, truncated
            {"prompt": long, "chosen": "ok", "rejected": "no"}]  # prompt fills max_length: dropped
    with pytest.warns(TruncationWarning, match="1 of 2 preference pairs truncated"):
        pairs, stats = tokenize_pairs(to_preference_examples(rows), tok, max_length=32)
    assert (stats.kept, stats.truncated, stats.dropped_no_completion) == (1, 1, 1)
    assert len(pairs[0].rejected) == 32 and len(pairs[0].chosen) < 32
    from qlora_jax.data import DataError

    with pytest.raises(DataError, match="row: 1"):
        to_preference_examples([rows[0], {"prompt": "x", "chosen": "a", "rejected": [{"role": "assistant",
                                                                                      "content": "b"}]}])
    with pytest.raises(DataError, match="'chosen' and 'rejected'"):
        to_preference_examples([{"prompt": "x", "completion": "y"}])


# -- the model: log-probs, reference, training signal --------------------------------------------------


def _demo_batch(tok, n_pairs, max_length=128):
    pairs, _ = prepare_preference(DEMO / "train.jsonl", tok, max_length=max_length)
    it = PreferenceBatchIterator(pairs[:n_pairs], batch_size=n_pairs, seq_len=max_length, shuffle=False,
                                 pad_to_multiple_of=16, pad_id=tok.pad_token_id)
    return next(it)


def test_sequence_logps_match_transformers_and_peft(tiny_model_dir, tok, tmp_path):
    """Summed completion log-probs of every row: adapters off vs transformers, adapters on vs peft."""
    from peft import PeftModel

    from qlora_jax.checkpoints.peft_io import save_peft_adapter

    lora = LoraConfig(r=4, alpha=8, dropout=0.0, init="gaussian", init_std=0.05)
    model, _ = load_model(tiny_model_dir, quantize=None, lora=lora, with_tokenizer=False)
    _randomize_b(model)
    save_peft_adapter(model, tmp_path / "adapter")
    batch = _demo_batch(tok, 3)
    graphdef, lora_state, rest = loop.split_model(model)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    base = np.asarray(sequence_logps(graphdef, lora_state, rest, jb, lora_enabled=False))
    adapted = np.asarray(sequence_logps(graphdef, lora_state, rest, jb, lora_enabled=True))

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()

    def torch_logps(m):
        out = []
        for row in range(batch["input_ids"].shape[0]):
            n = int((batch["segment_ids"][row] > 0).sum())
            ids = torch.from_numpy(batch["input_ids"][row, :n].astype(np.int64))[None]
            with torch.no_grad():
                logp = torch.log_softmax(m(ids).logits[0].double(), -1)
            targets = torch.from_numpy(batch["targets"][row, :n].astype(np.int64))
            picked = logp.gather(-1, targets[:, None])[:, 0].numpy()
            out.append((picked * batch["loss_mask"][row, :n]).sum())
        return np.array(out)

    with peft_model.disable_adapter():
        ref_base = torch_logps(peft_model)
    ref_adapted = torch_logps(peft_model)
    assert np.abs(ref_adapted - ref_base).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(base, ref_base, rtol=0, atol=1e-4)
    np.testing.assert_allclose(adapted, ref_adapted, rtol=0, atol=1e-4)


def test_reference_with_adapters_off_is_the_base_model(tiny_model_dir, tok):
    lora = LoraConfig(r=4, alpha=8, dropout=0.1, init="gaussian", init_std=0.05)
    model, _ = load_model(tiny_model_dir, quantize="nf4", lora=lora, with_tokenizer=False)
    _randomize_b(model)
    plain, _ = load_model(tiny_model_dir, quantize="nf4", lora=None, with_tokenizer=False)
    batch = {k: jnp.asarray(v) for k, v in _demo_batch(tok, 2).items()}
    graphdef, lora_state, rest = loop.split_model(model)
    reference = DPOObjective(beta=0.1).reference(graphdef, lora_state, rest, batch, None)
    h = plain.hidden_states(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    base = sequence_logprob(h, plain.lm_head_weight(), batch["targets"], batch["loss_mask"])
    np.testing.assert_allclose(np.asarray(reference), np.asarray(base), rtol=0, atol=1e-5)
    policy = sequence_logps(graphdef, lora_state, rest, batch)
    assert np.abs(np.asarray(policy) - np.asarray(base)).max() > 1e-2
    # stop_gradient: the reference contributes no gradient.
    g = jax.grad(lambda lo: jnp.sum(DPOObjective(beta=0.1).reference(graphdef, lo, rest, batch, None)))(lora_state)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g))


def test_dpo_steps_raise_reward_accuracy_and_accumulate_exactly(tiny_model_dir, tok):
    """From fresh adapters the first loss is log 2; steps on a small batch lower the loss and raise
    the reward accuracy; two micro-batches of 2 pairs give the update of one batch of 4."""
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, init="gaussian", init_std=0.05)
    model, _ = load_model(tiny_model_dir, quantize="nf4", lora=lora, with_tokenizer=False)
    batch = _demo_batch(tok, 4)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    key = jax.random.key_data(jax.random.key(0))
    objective = DPOObjective(beta=0.5)

    fns, lora_state, rest, opt = loop.make_step_fns(model, optax.adam(2e-2), mesh, objective=objective)
    stacked = loop.stack_microbatches([batch], tok.pad_token_id)
    losses, accuracies, margins = [], [], []
    for _ in range(8):
        lora_state, opt, m = fns.train_step(lora_state, opt, rest, stacked, key)
        losses.append(float(m["loss"]))
        accuracies.append(float(m["reward_correct"]) / float(m["pairs"]))
        margins.append((float(m["rewards_chosen"]) - float(m["rewards_rejected"])) / float(m["pairs"]))
    assert float(m["pairs"]) == 4
    # Policy = reference at init (B = 0): Delta = 0 up to float rounding between the two compiled
    # paths, so the loss is log 2 (the strict reward accuracy of exact ties would be 0).
    assert abs(losses[0] - LOG2) < 1e-5 and abs(margins[0]) < 1e-5
    assert losses[-1] < losses[0] - 0.05 and accuracies[-1] == 1.0, (losses, accuracies)

    # Gradient accumulation: a loss averaged over pairs, so 2 x 2 pairs == 1 x 4 pairs.
    model2, _ = load_model(tiny_model_dir, quantize="nf4", lora=lora, with_tokenizer=False)
    _randomize_b(model2)
    micro = [{k: v[i * 4:(i + 1) * 4] for k, v in batch.items()} for i in range(2)]  # 4 rows = 2 pairs

    def update(batches):
        fns, lo, rest, opt = loop.make_step_fns(model2, optax.sgd(1.0), mesh, objective=objective)
        before = jax.tree.map(np.asarray, lo)
        after, _, m = fns.train_step(lo, opt, rest, loop.stack_microbatches(batches, tok.pad_token_id), key)
        return jax.tree.map(lambda a, b: a - np.asarray(b), before, after), m

    g_acc, m_acc = update(micro)
    g_big, m_big = update([batch])
    np.testing.assert_allclose(float(m_acc["loss"]), float(m_big["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_acc), jax.tree.leaves(g_big)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-8)
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(g_big)) > 0


def test_early_stopping_state():
    s = EarlyStopping(patience=2)
    assert s.update(2, 0.5) and not s.update(4, 0.5) and not s.stopped  # a tie is no improvement
    assert s.update(6, 0.75) and s.bad_evals == 0
    assert not s.update(8, 0.6) and not s.update(10, 0.7) and s.stopped and s.best_step == 6
    assert EarlyStopping.from_state(s.state(), 2) == s


def test_config_checks_name_the_key():
    from qlora_jax.train.config import ConfigError, validate_config

    validate_config(dpo_config.get_config())
    validate_config(sft_config.get_config())
    for overrides, message in [
        ({"dpo.label_smoothing": 0.1}, "has no effect with loss_type='sigmoid'"),
        ({"dpo.loss_type": "robust", "dpo.label_smoothing": 0.5}, "config.dpo.label_smoothing=0.5"),
        ({"dpo.loss_type": "kto"}, "config.dpo.loss_type='kto'"),
        ({"dpo.reference": "init"}, "needs config.model.init_from"),
        ({"data.pack": True}, "config.data.pack"),
        ({"train.eval_every": 0}, "early_stopping_patience > 0 needs"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate_config(_set(dpo_config.get_config(), overrides))
    sft = sft_config.get_config()
    with sft.unlocked():
        sft.train.early_stopping_patience = 2
    with pytest.raises(ConfigError, match="objective='dpo', 'orpo', 'cpo' or 'kto' only"):
        validate_config(sft)


# -- the trainer end to end ------------------------------------------------------------------------


def _set(c, overrides):
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _dpo_overrides(model_dir, workdir, **extra):
    return {"workdir": str(workdir), "model.source": str(model_dir), "data.max_eval_examples": 8,
            "train.batch_size": 4, "train.max_steps": 6, "train.checkpoint_every": 2, "train.eval_every": 2,
            "lora.r": 4, "lora.alpha": 8.0, "lora.dropout": 0.0, "optim.lr": 1e-2, **extra}


def _train_cli(overrides: dict, env_extra: dict | None = None, cache: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; ``cache``: a persistent XLA compilation cache shared by the runs of
    one test (the same programs compile once, which halves a tiny run)."""
    args = [sys.executable, "-m", "qlora_jax.train", "--config", str(REPO / "configs/dpo.py")]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_early_stopping_keeps_the_best_adapter(tiny_model_dir, tmp_path):
    """lr 0: the policy stays the reference, reward accuracy never beats its first value, so the run
    stops after `patience` evaluations; best_adapter is a PEFT adapter; a rerun does not train on."""
    from qlora_jax.train.trainer import run

    cfg = _set(dpo_config.get_config(), _dpo_overrides(
        tiny_model_dir, tmp_path / "run", **{"optim.lr": 0.0, "train.early_stopping_patience": 1,
                                             "train.max_steps": 8, "model.quantize": "none",
                                             "data.max_eval_examples": 4}))
    result = run(cfg)
    assert result["early_stopped_at"] == 4 and result["final_step"] == 4
    assert result["best"]["step"] == 2
    best = json.loads((tmp_path / "run/best_adapter/eval_metrics.json").read_text())
    assert best["step"] == 2 and (tmp_path / "run/best_adapter/adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "run/best_adapter/adapter_config.json").read_text())["r"] == 4
    assert abs(result["eval_after"]["loss"] - LOG2) < 1e-5
    again = run(cfg)  # resumes at the stopped step and stays stopped
    assert again["final_step"] == 4 and again["early_stopped_at"] == 4


def test_dpo_from_sft_adapters_starts_at_log2_and_resumes_after_sigkill(tiny_model_dir, tmp_path):
    """With model.init_from an SFT run, the reference is its adapters frozen: Delta = 0 at step 0
    (loss log 2) although the adapters are far from zero. A run killed at step 5 and resumed logs
    the same losses as an uninterrupted one (the frozen reference comes back from the checkpoint)."""
    from qlora_jax.train.trainer import run

    sft = sft_config.get_config()
    _set(sft, {"workdir": str(tmp_path / "sft"), "model.source": str(tiny_model_dir), "data.eval": "",
               "train.batch_size": 4, "train.grad_accum": 1, "train.max_steps": 2, "train.generate_eval": 0,
               "train.export_peft": False, "lora.r": 4, "lora.alpha": 8.0, "optim.lr": 5e-2,
               "optim.warmup_ratio": 0.0})
    run(sft)

    over = _dpo_overrides(tiny_model_dir, tmp_path / "ref", **{"model.init_from": tmp_path / "sft",
                                                                "train.export_peft": False})
    cache = tmp_path / "xla_cache"
    ref = _train_cli(over, cache=cache)
    assert ref.returncode == 0, ref.stderr[-3000:]
    summary = json.loads((tmp_path / "ref/summary.json").read_text())
    assert summary["reference"] == "frozen starting adapters"
    assert abs(summary["eval_before"]["loss"] - LOG2) < 1e-5 and summary["eval_before"]["reward_accuracy"] == 0
    rows = read_metrics(tmp_path / "ref/metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert abs(train_rows[0]["loss"] - LOG2) < 1e-5
    assert summary["eval_after"]["loss"] != summary["eval_before"]["loss"]  # the adapters moved

    killed = _train_cli({**over, "workdir": tmp_path / "killed"}, {"QLORA_FAULT_KILL_AT_STEP": "5"}, cache)
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = _train_cli({**over, "workdir": tmp_path / "killed"}, cache=cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr

    def losses(workdir):
        return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in read_metrics(workdir / "metrics.jsonl")]

    assert losses(tmp_path / "killed") == losses(tmp_path / "ref")  # bit-identical floats, evals included
