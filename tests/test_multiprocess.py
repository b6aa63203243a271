"""Two processes on localhost (jax.distributed, gloo collectives), two fake CPU devices each,
train exactly like one process with four devices; their checkpoint restores in one process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _support import require

from qlora_jax.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
require("torch")
from tests.test_train import tiny_model_dir  # noqa: E402,F401  (fixture)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(model_dir: Path, workdir: Path) -> list[str]:
    overrides = {
        "workdir": workdir, "model.source": model_dir, "data.eval": "", "train.batch_size": 8,
        "train.grad_accum": 2, "train.max_steps": 4, "train.checkpoint_every": 2,
        "train.generate_eval": 0, "train.export_peft": False, "lora.r": 4, "lora.alpha": 8.0,
        "lora.dropout": 0.1, "optim.lr": 3e-3, "mesh.data": 2, "mesh.fsdp": 2,
    }
    return [sys.executable, "-m", "qlora_jax.train", "--config", str(REPO / "configs/sft.py")] + [
        f"--config.{k}={v}" for k, v in overrides.items()]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    env.update({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})
    env.update(extra)
    return env


def _losses(workdir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r]


def test_two_processes_equal_one_process(tiny_model_dir, tmp_path):  # noqa: F811
    # The one-process runs (before and after the two-process one) share an XLA compilation cache:
    # the resumed run reuses the programs the first compiled instead of compiling them again.
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    single = subprocess.run(_cmd(tiny_model_dir, tmp_path / "single"), cwd=REPO, env=_env(4, **cache),
                            capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]

    port = _free_port()
    procs = [
        subprocess.Popen(_cmd(tiny_model_dir, tmp_path / "multi"), cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         env=_env(2, QLORA_COORDINATOR=f"127.0.0.1:{port}", QLORA_NUM_PROCESSES="2",
                                  QLORA_PROCESS_ID=str(i)))
        for i in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "processes\": 2" in outs[0][1]  # the start-up summary of process 0
    ref = _losses(tmp_path / "single")
    multi = _losses(tmp_path / "multi")
    assert [s for s, _ in multi] == [1, 2, 3, 4]
    for (s1, a), (s2, b) in zip(ref, multi):
        assert s1 == s2 and a == pytest.approx(b, rel=2e-5)

    # Preempted after step 2: drop the step-4 checkpoint; one process (4 devices) resumes the
    # two-process run's step-2 checkpoint and reproduces steps 3 and 4.
    shutil.rmtree(tmp_path / "multi/checkpoints/4")
    resumed = subprocess.run(_cmd(tiny_model_dir, tmp_path / "multi"), cwd=REPO, env=_env(4, **cache),
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
    after = _losses(tmp_path / "multi")
    assert [s for s, _ in after] == [1, 2, 3, 4]
    for (s1, a), (s2, b) in zip(ref, after):
        assert s1 == s2 and a == pytest.approx(b, rel=2e-5)
