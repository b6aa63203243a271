"""What every side of ``bench/train_step.py`` shares: the spec it reads, the timing protocol,
the loss definition, peak RSS, and the record it writes.

Plain Python + numpy only: the qwix side runs this file under another interpreter
(``.venv-qwix``, see ``bench/train_step.py``), where neither qlora_jax nor torch is installed.

A side is started as ``python <side>.py <spec.json>``. The spec (written by the parent) holds
``model_dir`` (an HF directory: ``config.json`` + ``model.safetensors``), ``tokens`` (a ``.npy``
of int32 ``[batch, seq]`` token ids, the same for every side and every step), ``batch``, ``seq``,
``r``, ``alpha``, ``lr``, ``weight_decay``, ``max_grad_norm``, ``warmup``, ``steps``, ``dtype``
("auto" | "float32" | "bfloat16") and ``out`` (where the JSON record goes).

Loss, identical on every side: mean next-token cross-entropy over all ``batch * (seq - 1)``
positions that have a next token (transformers' ``labels=input_ids``; tunix's default PEFT loss
with an all-ones mask; qlora_jax's SFT objective with a loss mask that is 1 except at the last
position). Every step trains on the same batch, so the loss must fall from step to step.

Timing: step 0 is the first call (for JAX after an explicit lower + compile, timed apart as
``compile_s``); steps ``0 .. warmup-1`` are not timed; then ``steps`` steps are timed one by one,
each ending with a host sync (``float(loss)``: the loss is the step's last output).
tokens/s = batch * seq / median step time.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


_LOADAVG_START: list[float] = []


def read_spec() -> dict[str, Any]:
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} <spec.json>")
    _LOADAVG_START[:] = loadavg()
    return json.loads(Path(sys.argv[1]).read_text())


def model_config(spec: dict[str, Any]) -> dict[str, Any]:
    return json.loads((Path(spec["model_dir"]) / "config.json").read_text())


def tokens(spec: dict[str, Any]) -> np.ndarray:
    """int32 ``[batch, seq]``, the batch every step of every side trains on."""
    ids = np.load(spec["tokens"]).astype(np.int32)
    assert ids.shape == (spec["batch"], spec["seq"]), ids.shape
    return ids


def peak_rss_mib() -> float:
    """Peak resident set of this process (VmHWM; ru_maxrss where /proc is missing), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def run_steps(step: Callable[[], float], *, warmup: int, steps: int, log=None) -> dict[str, Any]:
    """Call ``step`` (one synced training step returning the loss) warmup + steps times.

    Returns the per-step losses, the first call's seconds, the timed steps' seconds and their
    median, and ``cores_used``: this process's CPU time (user + system, all threads) over the
    timed steps divided by their wall time -- on a machine shared with other jobs, well below
    the core count means the side was starved (threads that spin while waiting count as busy).
    ``warmup`` is at least 1 (the first call always includes one-time work).
    """
    warmup = max(1, warmup)
    losses, seconds, cpu = [], [], []
    for i in range(warmup + steps):
        c0 = os.times()
        t0 = time.perf_counter()
        loss = float(step())
        dt = time.perf_counter() - t0
        c1 = os.times()
        losses.append(loss)
        seconds.append(dt)
        cpu.append((c1.user - c0.user) + (c1.system - c0.system))
        if log is not None:
            log(f"step {i}: loss {loss:.4f}, {dt:.2f} s{' (warm-up)' if i < warmup else ''}")
    timed = seconds[warmup:]
    return {"losses": losses, "first_step_s": seconds[0], "step_s": timed, "step_cpu_s": cpu[warmup:],
            "median_step_s": statistics.median(timed) if timed else float("nan"),
            "cores_used": sum(cpu[warmup:]) / sum(timed) if timed else float("nan")}


def finish(spec: dict[str, Any], record: dict[str, Any]) -> None:
    """Add the shared fields (tokens/s, RSS, load) and write the record to ``spec["out"]``."""
    tokens_per_step = spec["batch"] * spec["seq"]
    med = record.get("median_step_s", float("nan"))
    record.update(
        tokens_per_step=tokens_per_step,
        tokens_per_s=tokens_per_step / med if med and med == med else float("nan"),
        peak_rss_mib=peak_rss_mib(),
        loadavg_start=list(_LOADAVG_START),
        loadavg_end=loadavg(),
        python=sys.executable,
    )
    Path(spec["out"]).write_text(json.dumps(record, indent=1))


def log(side: str):
    def emit(msg: str) -> None:
        print(f"[{side}] {msg}", file=sys.stderr, flush=True)

    return emit


def jax_memory(compiled) -> dict[str, int]:
    """XLA's ``memory_analysis()`` of a compiled step, in bytes (``args_plus_temp``: the issue's figure)."""
    mem = compiled.memory_analysis()
    if mem is None:
        return {}
    out = {
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "generated_code_bytes": int(mem.generated_code_size_in_bytes),
    }
    out["args_plus_temp_bytes"] = out["argument_bytes"] + out["temp_bytes"]
    return out


def jax_dtype_name(spec: dict[str, Any], platform: str) -> str:
    """``spec["dtype"]``, with "auto" = float32 on CPU and bfloat16 on GPU/TPU."""
    if spec["dtype"] != "auto":
        return spec["dtype"]
    return "float32" if platform == "cpu" else "bfloat16"
