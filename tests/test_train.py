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
from _support import require

torch = require("torch")
transformers = require("transformers")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import sft as sft_config  # noqa: E402
from qlora_jax.checkpoints import gguf_tokenizer, resolve_builtin  # noqa: E402
from qlora_jax.objectives.sft import nll_sums  # noqa: E402
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


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory) -> Path:
    """A persistent XLA compilation cache shared by this module's CLI runs (as in test_dpo and
    test_grpo): the same programs compile once, not once per process."""
    return tmp_path_factory.mktemp("xla_cache")


def _train_cli(config_overrides: dict, env_extra: dict | None = None,
               cache: Path | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "qlora_jax.train", "--config", str(REPO / "configs/sft.py")]
    args += [f"--config.{k}={v}" for k, v in config_overrides.items()]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _cli_overrides(model_dir: Path, workdir: Path) -> dict:
    return {
        "workdir": workdir, "model.source": model_dir, "data.max_eval_examples": 8, "train.batch_size": 4,
        "train.grad_accum": 2, "train.max_steps": 6, "train.checkpoint_every": 2, "train.generate_eval": 0,
        "lora.r": 4, "lora.alpha": 8.0, "lora.dropout": 0.1, "optim.lr": 3e-3, "optim.warmup_ratio": 0.2,
        "train.export_peft": False,
    }


def test_killed_run_resumes_with_identical_losses(tiny_model_dir, tmp_path, xla_cache):
    ref = _train_cli(_cli_overrides(tiny_model_dir, tmp_path / "ref"), cache=xla_cache)
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = _train_cli(_cli_overrides(tiny_model_dir, tmp_path / "killed"), {"QLORA_FAULT_KILL_AT_STEP": "5"},
                        xla_cache)
    assert killed.returncode == -9, killed.stderr[-3000:]
    ckpts = sorted(int(p.name) for p in (tmp_path / "killed/checkpoints").iterdir() if p.name.isdigit())
    assert ckpts and max(ckpts) == 4  # steps 2 and 4 were saved; step 6 never happened
    resumed = _train_cli(_cli_overrides(tiny_model_dir, tmp_path / "killed"), cache=xla_cache)
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
    from qlora_jax.train.config import lora_config_from
    from qlora_jax.train.trainer import run

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

    def one_step(batches, **layout):
        fns, lora_state, rest, opt = loop.make_step_fns(model, tx, mesh, **layout)
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
        s, n = nll_sums(graphdef, adapters, rest, batch, deterministic=True)
        return s / n

    direct = jax.grad(mean_loss)(lora_state)
    for a, b in zip(jax.tree.leaves(g_acc), jax.tree.leaves(direct)):
        np.testing.assert_allclose(a, np.asarray(b), rtol=2e-4, atol=1e-7)
    # The TPU path (frozen state moved into the layouts an ahead-of-time compile picks, the step
    # jit'd with them) (it donates the model's frozen arrays, so it runs last) runs the same arithmetic: on CPU the chosen layouts are the default ones.
    g_auto, m_auto = one_step(micro, frozen_layout="auto", example_batch=(2, 64))
    assert float(m_auto["loss"]) == float(m_acc["loss"])
    for a, b in zip(jax.tree.leaves(g_auto), jax.tree.leaves(g_acc)):
        np.testing.assert_array_equal(a, b)


def test_bad_data_and_nan_loss_stop_cleanly(tiny_model_dir, tmp_path, xla_cache):
    bad = tmp_path / "bad.jsonl"
    good = (REPO / "data/sft_demo/train.jsonl").read_text().splitlines()
    bad.write_text("\n".join(good[:5] + ['{"messages": [oops'] + good[5:10]) + "\n")
    proc = _train_cli({**_cli_overrides(tiny_model_dir, tmp_path / "w1"), "data.train": bad})
    assert proc.returncode == 2 and f"{bad}:6" in proc.stderr, proc.stderr[-2000:]

    # A learning rate of 1e30 overflows the adapters after the first update: step 2's loss is
    # not finite. The run stops naming step 2; step 1's checkpoint holds the adapters that gave it
    # (finite, near 1e30: resuming would give NaN again), so it is removed and none is left. The
    # metrics of step 1 are kept.
    over = {**_cli_overrides(tiny_model_dir, tmp_path / "w2"), "optim.lr": 1e30, "optim.warmup_ratio": 0.0,
            "optim.max_grad_norm": 0.0, "train.checkpoint_every": 1, "lora.dropout": 0.0}
    proc = _train_cli(over, cache=xla_cache)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "non-finite loss or gradient at step 2" in proc.stderr
    assert ("removed checkpoint 1, whose adapters gave it; no checkpoint with finite adapters and optimizer state "
            "is left; a rerun starts from step 0") in proc.stderr
    ckpts = sorted(int(p.name) for p in (tmp_path / "w2/checkpoints").iterdir() if p.name.isdigit())
    assert ckpts == []
    rows = [r for r in read_metrics(tmp_path / "w2/metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1] and np.isfinite(rows[0]["loss"])


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_nan_stop_keeps_the_newest_checkpoint_worth_resuming(tiny_model_dir, tmp_path, xla_cache):
    """lr 1e30 warmed up over 3 steps: step 1 (lr 0) leaves the adapters as they were, step 2 blows
    them up to ~3e29 (finite: checkpoint 2 is saved), step 3's loss is NaN. Resuming from checkpoint
    2 would give NaN again: it is removed and the message names step 1. A rerun with a sane lr
    resumes from step 1 and finishes with finite losses."""
    workdir = tmp_path / "w"
    over = {**_cli_overrides(tiny_model_dir, workdir), "optim.lr": 1e30, "optim.warmup_ratio": 0.5,
            "optim.max_grad_norm": 0.0, "train.checkpoint_every": 1, "lora.dropout": 0.0}
    proc = _train_cli(over, cache=xla_cache)
    assert proc.returncode == 3, proc.stderr[-3000:]
    err = _error_line(proc.stderr)
    assert err.startswith("error: non-finite loss or gradient at step 3 (loss="), err
    assert err.endswith("; stopped; removed checkpoint 2, whose adapters gave it; the newest checkpoint with finite "
                        "adapters and optimizer state is step 1; resume continues from it (the same config stops at "
                        "step 3 again: lower --config.optim.lr)"), err
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [1]

    resumed = _train_cli({**over, "optim.lr": 3e-3}, cache=xla_cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 1" in resumed.stderr and "resumed from" in resumed.stderr
    rows = [r for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in rows)
    assert np.isfinite(json.loads((workdir / "summary.json").read_text())["eval_after"]["loss"])


def test_non_finite_stop_names_the_checkpoint_left(tmp_path):
    """The finiteness check (host-memory leaves included) and the checkpoint bookkeeping, without a model."""
    from qlora_jax.checkpoints import run_dir as ckpt_lib
    from qlora_jax.train.trainer import non_finite_stop

    tree = {"lora": jnp.ones((2, 3)), "count": jnp.int32(7)}
    assert ckpt_lib.all_finite(tree)
    assert not ckpt_lib.all_finite({**tree, "mu": jnp.array([1.0, jnp.nan])})
    assert not ckpt_lib.all_finite({"nu": jnp.array([jnp.inf], jnp.bfloat16)})
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    assert not ckpt_lib.all_finite({"nu": jax.device_put(jnp.array([1.0, -jnp.inf]), host)})
    assert ckpt_lib.all_finite({"nu": jax.device_put(jnp.array([1.0, 3e38]), host)})

    ckpts = ckpt_lib.RunCheckpoints(tmp_path, async_save=False)
    for step in (1, 2):
        ckpts.save(step, tree, {"rng": jnp.zeros(2)}, {"step": step})
    err = non_finite_stop(ckpts, "non-finite loss or gradient at step 3 (loss=nan, grad_norm=nan)", failed_step=3,
                          bad_checkpoint=2)
    assert str(err) == ("non-finite loss or gradient at step 3 (loss=nan, grad_norm=nan); stopped; removed "
                        "checkpoint 2, whose adapters gave it; the newest checkpoint with finite adapters and "
                        "optimizer state is step 1; resume continues from it (the same config stops at step 3 "
                        "again: lower --config.optim.lr)")
    assert ckpts.all_steps() == [1] and [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["1"]
    err = non_finite_stop(ckpts, "non-finite adapters or optimizer state after step 2 (not saved)", failed_step=2)
    assert "step 2 (not saved); stopped; the newest checkpoint with finite adapters and optimizer state is step 1" \
        in str(err) and ckpts.all_steps() == [1]
    err = non_finite_stop(ckpts, "non-finite loss or gradient at step 2", failed_step=2, bad_checkpoint=1)
    assert "; no checkpoint with finite adapters and optimizer state is left; a rerun starts from step 0" in str(err)
    assert ckpts.all_steps() == []
    ckpts.close()


def _snapshot(workdir: Path) -> dict[str, tuple[int, bytes]]:
    return {p.relative_to(workdir).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(workdir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("objective", ["sft", "grpo"])
def test_finished_run_is_reported_and_left_alone(objective, tmp_path, capsys):
    """Running a finished run again says so, loads nothing (the model source does not even exist),
    writes nothing and returns the stored summary. Unfinished runs are not mistaken for one."""
    from configs import grpo as grpo_config
    from qlora_jax.train.config import ConfigError
    from qlora_jax.train.trainer import already_finished, run

    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "6").mkdir(parents=True)
    (workdir / "adapter").mkdir()
    summary = {"final_step": 6, "total_steps": 6, "finished": True, "max_steps": 6, "epochs": 0.5,
               "train_seconds": 131.0, "adapter_dir": str(workdir / "adapter")}
    (workdir / "summary.json").write_text(json.dumps(summary))
    (workdir / "metrics.jsonl").write_text('{"step": 6, "loss": 0.5}\n')
    before = _snapshot(workdir)
    cfg = (sft_config if objective == "sft" else grpo_config).get_config()
    cfg.workdir = str(workdir)
    cfg.model.source = str(tmp_path / "no-such-model")
    cfg.train.max_steps = 6
    assert run(cfg) == {**summary, "already_finished": True}
    assert capsys.readouterr().out.splitlines() == [
        f"already finished: the run in {workdir} trained 6/6 steps; nothing was changed",
        f"summary        {workdir / 'summary.json'}",
        f"PEFT adapter   {workdir / 'adapter'}",
        "to train again, start a new run: --config.workdir=<new dir>"]
    assert _snapshot(workdir) == before and not (workdir / "train.log").exists()

    cfg.train.max_steps = 8  # a longer run asked for: it resumes from checkpoint 6
    assert already_finished(cfg) is None
    (workdir / "checkpoints" / "6").rmdir()  # ... but with no checkpoint it would start over: refused
    with pytest.raises(ConfigError, match=r"holds a finished run of 6 steps and no checkpoint to continue it from; "
                                          r"start a new run: --config.workdir=<new dir>"):
        already_finished(cfg)
    (workdir / "checkpoints" / "6").mkdir()
    cfg.train.max_steps = 6
    (workdir / "checkpoints" / "8").mkdir()  # a newer checkpoint than the summary's step
    assert already_finished(cfg) is None
    (workdir / "checkpoints" / "8").rmdir()
    (workdir / "summary.json").write_text(json.dumps({**summary, "final_step": 4, "finished": False}))  # SIGTERM
    assert already_finished(cfg) is None
    if objective == "sft":  # length from epochs
        (workdir / "summary.json").write_text(json.dumps({**summary, "max_steps": -1}))
        cfg.train.max_steps, cfg.train.epochs = -1, 0.5
        assert already_finished(cfg) is not None
        cfg.train.epochs = 1.0
        assert already_finished(cfg) is None
    assert capsys.readouterr().out.count("already finished") == (1 if objective == "sft" else 0)


def test_restart_after_early_kill_then_rerun_of_the_finished_run(tiny_model_dir, tmp_path, xla_cache):
    """Killed at step 1, before the first checkpoint: the restarted run starts from step 0 and
    keeps none of the dead attempt's metric rows. Run again once finished: nothing changes."""
    workdir = tmp_path / "w"
    over = {**_cli_overrides(tiny_model_dir, workdir), "train.max_steps": 2, "train.checkpoint_every": 2}
    killed = _train_cli(over, {"QLORA_FAULT_KILL_AT_STEP": "1"}, xla_cache)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [r["step"] for r in read_metrics(workdir / "metrics.jsonl")] == [0, 1]  # eval before, step 1
    assert not [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]

    restarted = _train_cli(over, cache=xla_cache)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "resumed from" not in restarted.stderr
    rows = read_metrics(workdir / "metrics.jsonl")
    assert [(r["step"], "loss" in r, "eval_loss" in r) for r in rows] == [
        (0, False, True), (1, True, False), (2, True, False), (2, False, True)]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["finished"] is True and summary["final_step"] == 2

    before = _snapshot(workdir)
    again = _train_cli(over)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines()[0] == f"already finished: the run in {workdir} trained 2/2 steps; nothing was changed"
    assert "to train again, start a new run: --config.workdir=<new dir>" in again.stdout
    assert "done:" not in again.stdout and "loading" not in again.stderr
    assert _snapshot(workdir) == before
