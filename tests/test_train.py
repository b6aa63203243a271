"""The SFT trainer end to end on a tiny random LLaMA with the built-in model's tokenizer.

References: transformers + peft (PEFT export reproduces our logits), closed-form gradient
accumulation (a big batch in one micro-batch), a run killed with SIGKILL (resume must give the
same per-step losses as an uninterrupted run), and ml_collections' own config checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import sft as sft_config  # noqa: E402
from qlora_jax.checkpoints import gguf_tokenizer, resolve_builtin  # noqa: E402
from qlora_jax.train.metrics import read_metrics  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random LLaMA (tied embeddings) saved by transformers, with SmolLM2's tokenizer."""
    d = tmp_path_factory.mktemp("tiny_llama")
    tok = gguf_tokenizer(resolve_builtin("smollm2-135m-instruct"))
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _config(model_dir: Path, workdir: Path, **overrides):
    c = sft_config.get_config()
    c.workdir = str(workdir)
    c.model.source = str(model_dir)
    c.data.train = str(REPO / "data/sft_demo/train.jsonl")
    c.data.eval = str(REPO / "data/sft_demo/eval.jsonl")
    c.data.max_eval_examples = 8
    c.train.batch_size = 4
    c.train.grad_accum = 2
    c.train.max_steps = 6
    c.train.checkpoint_every = 2
    c.train.generate_eval = 0
    c.lora.r = 4
    c.lora.alpha = 8.0
    c.lora.dropout = 0.0
    c.optim.lr = 3e-3
    c.optim.warmup_ratio = 0.2
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _train_cli(config_overrides: dict, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "qlora_jax.train", "--config", str(REPO / "configs/sft.py")]
    args += [f"--config.{k}={v}" for k, v in config_overrides.items()]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _cli_overrides(model_dir: Path, workdir: Path) -> dict:
    return {
        "workdir": workdir, "model.source": model_dir, "data.max_eval_examples": 8, "train.batch_size": 4,
        "train.grad_accum": 2, "train.max_steps": 6, "train.checkpoint_every": 2, "train.generate_eval": 0,
        "lora.r": 4, "lora.alpha": 8.0, "lora.dropout": 0.1, "optim.lr": 3e-3, "optim.warmup_ratio": 0.2,
        "train.export_peft": False,
    }


def test_killed_run_resumes_with_identical_losses(tiny_model_dir, tmp_path):
    ref = _train_cli(_cli_overrides(tiny_model_dir, tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = _train_cli(_cli_overrides(tiny_model_dir, tmp_path / "killed"), {"QLORA_FAULT_KILL_AT_STEP": "5"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    ckpts = sorted(int(p.name) for p in (tmp_path / "killed/checkpoints").iterdir() if p.name.isdigit())
    assert ckpts and max(ckpts) == 4  # steps 2 and 4 were saved; step 6 never happened
    resumed = _train_cli(_cli_overrides(tiny_model_dir, tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr

    def losses(workdir):
        return [(r["step"], r["loss"]) for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r]

    assert [s for s, _ in losses(tmp_path / "ref")] == list(range(1, 7))
    assert losses(tmp_path / "killed") == losses(tmp_path / "ref")  # bit-identical floats


def test_bad_config_keys_fail_clearly(tiny_model_dir, tmp_path):
    unknown = _train_cli({"optim.lrr": 1e-3})
    assert unknown.returncode != 0 and "lrr" in unknown.stderr
    wrong_type = _train_cli({"train.batch_size": "eight"})
    assert wrong_type.returncode != 0 and "batch_size" in wrong_type.stderr
    bad_choice = _train_cli({"model.quantize": "int3", "workdir": tmp_path})
    assert bad_choice.returncode == 2 and "config.model.quantize='int3'" in bad_choice.stderr
    missing = _train_cli({"model.source": tmp_path / "nope.gguf", "workdir": tmp_path})
    assert missing.returncode == 2 and "nope.gguf" in missing.stderr


def test_train_learns_and_exports_peft_adapter(tiny_model_dir, tmp_path):
    """Loss falls; the PEFT adapter loaded by peft onto transformers reproduces our logits."""
    from peft import PeftModel

    from qlora_jax.checkpoints.load import load_model
    from qlora_jax.checkpoints.peft_io import load_peft_adapter
    from qlora_jax.train.run import lora_config_from, run

    cfg = _config(tiny_model_dir, tmp_path / "run", **{"model.quantize": "none", "train.max_steps": 8,
                                                      "optim.lr": 1e-2})
    result = run(cfg)
    assert result["final_step"] == 8
    assert result["eval_after"]["loss"] < result["eval_before"]["loss"]
    rows = read_metrics(tmp_path / "run/metrics.jsonl")
    assert (tmp_path / "run/loss.png").stat().st_size > 1000
    assert any(p.name.startswith("events") for p in (tmp_path / "run/tensorboard").iterdir())
    assert len([r for r in rows if "loss" in r]) == 8
    adapter = tmp_path / "run/adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    ids = np.random.default_rng(0).integers(0, 1000, (2, 24))
    with torch.no_grad():
        ref = peft_model(torch.from_numpy(ids)).logits.numpy()
    # The adapters trained away from zero: the adapted logits differ from the base model's.
    with torch.no_grad(), peft_model.disable_adapter():
        base_logits = peft_model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(ref - base_logits).max() > 1e-3

    model, _ = load_model(tiny_model_dir, quantize=None, lora=lora_config_from(cfg), with_tokenizer=False)
    load_peft_adapter(model, adapter)
    ours = np.asarray(model(jnp.asarray(ids)))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_gradient_accumulation_equals_big_batch(tiny_model_dir):
    """4 micro-batches of 2 give the gradient of one batch of 8 (token-weighted mean)."""
    from qlora_jax import data as data_lib
    from qlora_jax.checkpoints.load import load_model
    from qlora_jax.lora import LoraConfig
    from qlora_jax.train import loop, sharding

    lora = LoraConfig(r=4, alpha=8, dropout=0.0, init="gaussian", init_std=0.05)
    model, tok = load_model(tiny_model_dir, quantize="nf4", lora=lora)
    # B starts at zero, which would hide any error in A's gradient: give it values.
    for view in model.iter_linears():
        b = view.linear.lora_b.get_value()
        view.linear.lora_b.set_value(jax.random.normal(jax.random.key(1), b.shape, b.dtype) * 0.05)
    examples, _ = data_lib.prepare_sft(REPO / "data/sft_demo/train.jsonl", tok, max_length=64)
    it = data_lib.BatchIterator(examples[:8], batch_size=8, seq_len=64, shuffle=False, pad_id=0)
    big = next(it)
    micro = [{k: v[i * 2:(i + 1) * 2] for k, v in big.items()} for i in range(4)]
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    tx = optax.sgd(1.0)  # new = old - grad: the update is the gradient itself
    key = jax.random.key_data(jax.random.key(0))

    def one_step(batches):
        fns, lora_state, rest, opt = loop.make_step_fns(model, tx, mesh)
        before = jax.tree.map(np.asarray, lora_state)
        after, _, m = fns.train_step(lora_state, opt, rest, loop.stack_microbatches(batches, 0), key)
        return jax.tree.map(lambda a, b: a - np.asarray(b), before, after), m

    g_acc, m_acc = one_step(micro)
    g_big, m_big = one_step([big])
    assert float(m_acc["tokens"]) == float(m_big["tokens"]) == big["loss_mask"].sum()
    np.testing.assert_allclose(float(m_acc["loss"]), float(m_big["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_acc), jax.tree.leaves(g_big)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7)
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(g_big)) > 0
    # And against a direct mean token loss of the whole batch, differentiated by jax.
    graphdef, lora_state, rest = loop.split_model(model)
    batch = {k: jnp.asarray(v) for k, v in big.items()}

    def mean_loss(adapters):
        s, n = loop._forward_sums(graphdef, adapters, rest, batch, None, deterministic=True)
        return s / n

    direct = jax.grad(mean_loss)(lora_state)
    for a, b in zip(jax.tree.leaves(g_acc), jax.tree.leaves(direct)):
        np.testing.assert_allclose(a, np.asarray(b), rtol=2e-4, atol=1e-7)


def test_bad_data_and_nan_loss_stop_cleanly(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = (REPO / "data/sft_demo/train.jsonl").read_text().splitlines()
    bad.write_text("\n".join(good[:5] + ['{"messages": [oops'] + good[5:10]) + "\n")
    proc = _train_cli({**_cli_overrides(tiny_model_dir, tmp_path / "w1"), "data.train": bad})
    assert proc.returncode == 2 and f"{bad}:6" in proc.stderr, proc.stderr[-2000:]

    # A learning rate of 1e30 overflows the adapters after the first update: step 2's loss is
    # not finite. The run stops naming step 2, step 1's checkpoint stays the newest, and the
    # metrics of step 1 are kept.
    over = {**_cli_overrides(tiny_model_dir, tmp_path / "w2"), "optim.lr": 1e30, "optim.warmup_ratio": 0.0,
            "optim.max_grad_norm": 0.0, "train.checkpoint_every": 1, "lora.dropout": 0.0}
    proc = _train_cli(over)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "non-finite loss or gradient at step 2" in proc.stderr and "(step 1)" in proc.stderr
    ckpts = sorted(int(p.name) for p in (tmp_path / "w2/checkpoints").iterdir() if p.name.isdigit())
    assert ckpts == [1]
    rows = [r for r in read_metrics(tmp_path / "w2/metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1] and np.isfinite(rows[0]["loss"])
