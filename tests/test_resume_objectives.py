"""Exact resume for ORPO and KTO: a run SIGKILLed after step 3 and resumed from its step-2
checkpoint logs the same metric rows, bit for bit, as the same run left alone (training rows: loss,
rewards, accuracies, the KL estimate, lr, grad norm; evaluation rows), and ends with the same
adapters, final and best. (SimPO and CPO are the same task as ORPO, ``ReferenceFreeTask``, with
another pure loss; the SimPO case passes too but costs ~30 s more: add ``"simpo": ("configs/simpo.py",
"data/dpo_demo/train.jsonl", 9, 2)`` to ``CASES`` to run it.)

Reference: the uninterrupted run. The configs exercise what a resume must bring back: LoRA dropout
(the RNG), warm-up then cosine (the schedule), two micro-batches per step, held-out evaluations
with the best adapter and early stopping state, and a training set of 9 pairs / 10 KTO rows, so
that the run crosses epochs (a reshuffle) and trains on the short last batch of an epoch. For KTO
the KL rows are the mismatched completions of each micro-batch, rebuilt from the restored data
position.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _support import write_tiny_llama

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qlora_jax.train.metrics import read_metrics  # noqa: E402

KILL_AT, CHECKPOINT_EVERY, STEPS = 3, 2, 4
TIMING = ("tokens_per_s",)  # the only wall-clock figure of these rows

# objective -> (config file, demo training set, its first lines trained on, config.train.batch_size):
# 9 pairs in micro-batches of 2 pairs (4 rows), 10 KTO rows in micro-batches of 4 rows (and 4 KL
# rows), 2 micro-batches a step: resumed after step 2, the run crosses into the second epoch (pairs)
# or resumes inside it (KTO), and trains on an epoch's short last batch.
CASES = {"orpo": ("configs/orpo.py", "data/dpo_demo/train.jsonl", 9, 2),
         "kto": ("configs/kto.py", "data/kto_demo/train.jsonl", 10, 4)}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from qlora_jax.checkpoints import gguf_tokenizer, resolve_builtin

    tok = gguf_tokenizer(resolve_builtin("smollm2-135m-instruct"))
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama_resume"), tok)


def _overrides(name: str, model_dir: Path, workdir: Path, train_file: Path) -> dict:
    batch_size = CASES[name][3]
    return {"workdir": workdir, "model.source": model_dir, "model.quantize": "none", "model.remat": "none",
            "data.train": train_file, "data.max_eval_examples": 4, "data.pad_to_multiple_of": 128,
            "lora.r": 4, "lora.alpha": 8.0, "lora.dropout": 0.1, "lora.targets": "q_proj,v_proj",
            "train.batch_size": batch_size, "train.grad_accum": 2, "train.max_steps": STEPS,
            "train.checkpoint_every": CHECKPOINT_EVERY, "train.eval_every": 2, "train.early_stopping_patience": 3,
            "optim.lr": 1e-2, "optim.warmup_ratio": 0.25}


def _config(name: str, overrides: dict):
    import importlib

    c = importlib.import_module(f"configs.{name}").get_config()
    with c.unlocked():
        for key, value in overrides.items():
            node = c
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = str(value) if isinstance(value, Path) else value
    return c


def _killed_run(name: str, overrides: dict, log: Path) -> int:
    """The CLI in a subprocess that SIGKILLs itself after step ``KILL_AT``; its return code. It
    inherits the session's XLA cache (tests/conftest.py) and this process's matmul precision, so it
    reads back the programs the uninterrupted run compiled instead of compiling them again."""
    args = [sys.executable, "-m", "qlora_jax.train", "--config", str(REPO / CASES[name][0])]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest",
           "QLORA_FAULT_KILL_AT_STEP": str(KILL_AT)}
    with log.open("w") as out:
        return subprocess.run(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600).returncode


def _rows(workdir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(workdir / "metrics.jsonl")]


def _adapter(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


@pytest.mark.parametrize("name", list(CASES))
def test_killed_run_resumes_with_identical_metrics_and_adapters(name, tiny_dir, tmp_path):
    from qlora_jax.train.trainer import run

    _, source, lines, _ = CASES[name]
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join((REPO / source).read_text().splitlines(keepends=True)[:lines]))
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    ref = run(_config(name, _overrides(name, tiny_dir, ref_dir, train_file)))  # uninterrupted, in this process
    killed = _killed_run(name, _overrides(name, tiny_dir, killed_dir, train_file), tmp_path / "killed.log")
    assert killed == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert [r["step"] for r in _rows(killed_dir) if "loss" in r] == [1, 2, 3]  # step 3 logged, then the kill
    assert sorted(int(p.name) for p in (killed_dir / "checkpoints").iterdir() if p.name.isdigit()) == [2]

    resumed = run(_config(name, _overrides(name, tiny_dir, killed_dir, train_file)))
    assert "resumed from" in (killed_dir / "train.log").read_text()

    ref_rows = _rows(ref_dir)
    train_rows = [r for r in ref_rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
    assert [r["step"] for r in ref_rows if "eval_loss" in r] == [0, 2, 4]
    expected = {"loss", "grad_norm", "lr", "rewards_chosen", "rewards_rejected", "reward_margin", "logps_chosen"}
    expected |= {"kl", "label_accuracy"} if name == "kto" else {"reward_accuracy"}
    assert all(expected <= set(r) for r in train_rows), (expected, train_rows[0])
    if name == "kto":
        assert train_rows[-1]["kl"] > 0  # the KL rows moved with the adapters: their estimate is in play
    assert len({r["lr"] for r in train_rows}) == STEPS and len({r["loss"] for r in train_rows}) == STEPS
    assert _rows(killed_dir) == ref_rows  # bit-identical floats, evaluations included

    for key in ("final_step", "eval_before", "eval_after"):
        assert resumed[key] == ref[key], key
    assert {k: v for k, v in resumed["best"].items() if k != "adapter_dir"} == {
        k: v for k, v in ref["best"].items() if k != "adapter_dir"}
    for sub in ("adapter", "best_adapter"):
        a, b = _adapter(ref_dir / sub), _adapter(killed_dir / sub)
        assert a.keys() == b.keys() and a
        for k in a:
            np.testing.assert_array_equal(b[k], a[k], err_msg=f"{sub}/{k}")
