"""The planner's verdicts when a compile does not produce figures (no TPU/GPU venv needed).

An out-of-memory compile is a verdict (a row with the error and, where XLA says it, the bytes
needed); any other compiler failure is one line naming the target (``PlanError``), not a
traceback; a TPU target without libtpu is one line on the command line, exit status 2.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from _support import REPO

from qlora_jax.train import aot

SPEC = aot.StepSpec(hf_config={}, lora=None, quant=None, dtype="bfloat16", param_dtype="bfloat16", remat="full",
                    micro_batch=1, grad_accum=1, seq=16, mesh=(1, 1, 1), optimizer={})


class _Step:
    """Stands in for the jit'd step: ``lower(...).compile()`` raises what XLA raised."""

    def __init__(self, error: Exception):
        self.error = error

    def lower(self, *args):
        return self

    def compile(self):
        raise self.error


def _measure(monkeypatch, error: Exception) -> aot.StepMemory:
    monkeypatch.setattr(aot, "step_arguments", lambda spec, devices: (_Step(error), ()))
    return aot.measure(SPEC, aot.TARGETS["v5e-8"], devices=[])


def test_out_of_memory_is_a_row_with_the_bytes_needed(monkeypatch):
    msg = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
           "Used 22.87G of 15.75G hbm. Exceeded hbm capacity by 7.12G.\n"
           "Total hbm usage >= 23.12G:\n    reserved 258.00M\n    program 22.87G\n    arguments 0B\n"
           "Output size 0B; shares 0B with arguments.\n22.87G required for HLO temporaries (22.87G)\nmore")
    row = _measure(monkeypatch, RuntimeError(msg))
    assert not row.fits
    assert row.error.startswith("RESOURCE_EXHAUSTED") and "\n" not in row.error
    assert row.required == int(22.87 * 2**30)


def test_other_compile_failures_are_one_line_naming_the_target(monkeypatch):
    error = RuntimeError("\nINTERNAL: CUDA Runtime error: Error loading CUDA libraries.\n  at frame 1\n  at frame 2")
    with pytest.raises(aot.PlanError) as info:
        _measure(monkeypatch, error)
    assert str(info.value) == "v5e-8: the compiler failed, not on memory: INTERNAL: CUDA Runtime error: Error loading CUDA libraries."
    assert info.value.__cause__ is error  # the original error stays chained to it


def test_tpu_target_without_libtpu_is_one_line(tmp_path):
    if aot.libtpu_available():
        pytest.skip("libtpu is installed in this venv: the planner would compile")
    proc = subprocess.run([sys.executable, "-m", "qlora_jax.plan", "--config", str(REPO / "configs/sft.py"),
                           "--target", "v5e-8"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "needs libtpu" in lines[0] and "make .venv-tpu" in lines[0], proc.stderr
