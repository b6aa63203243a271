"""python -m qlora_jax.plan --config configs/sft.py --target v5e-8 [--fit] [--min_hbm] [--json]
    [--keep_dtype] [--config.key=value ...]

Flags only; the compiling and measuring is :mod:`qlora_jax.train.aot`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from absl import flags

from qlora_jax.cli._common import ConfigFlag, run_absl
from qlora_jax.train.aot import (
    GIB,
    TARGETS,
    PlanError,
    _batch_chips,
    _line,
    _need_libtpu,
    fit,
    measure,
    min_hbm_mib,
    resolve_mesh,
    spec_from_config,
    target_devices,
)

# defined by define_flags(): absl takes one definition per process
_CONFIG = ConfigFlag("Path to a config file (configs/*.py).")
_TARGET = _FIT = _MIN_HBM = _KEEP_DTYPE = _JSON = None


def define_flags() -> None:
    global _TARGET, _FIT, _MIN_HBM, _KEEP_DTYPE, _JSON
    _CONFIG.define()
    _TARGET = flags.DEFINE_string("target", "v5e-8", f"What to compile for: {', '.join(TARGETS)}.")
    _FIT = flags.DEFINE_bool("fit", False, "Search the cheapest remat policy and the largest micro-batch that fit.")
    _MIN_HBM = flags.DEFINE_bool("min_hbm", False, "Also bisect the smallest per-chip memory it compiles in (TPU).")
    _KEEP_DTYPE = flags.DEFINE_bool("keep_dtype", False, "Keep a float32 model.dtype on TPU targets.")
    _JSON = flags.DEFINE_bool("json", False, "Print one JSON line.")


def main(argv):
    cfg = _CONFIG.value
    name = _TARGET.value
    if name not in TARGETS:
        raise PlanError(f"--target={name}: unknown target (known: {', '.join(TARGETS)})")
    target = TARGETS[name]
    _need_libtpu(target)
    devices = target_devices(target)
    if target.platform == "cpu":  # this machine: its devices share the host's memory
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB / len(devices)
        target = dataclasses.replace(target, chips=len(devices), hbm_gib=round(host, 1), available_gib=round(host, 1))
    spec = spec_from_config(cfg, target, keep_dtype=_KEEP_DTYPE.value)
    spec = dataclasses.replace(spec, mesh=resolve_mesh(spec.mesh, target.chips))
    if spec.micro_batch % _batch_chips(spec.mesh):
        raise PlanError(f"train.batch_size={spec.micro_batch} is not divisible by mesh.data*mesh.fsdp="
                        f"{_batch_chips(spec.mesh)}")
    config_name = os.path.basename(str(cfg.model.source))
    if not _JSON.value:
        print(f"{config_name} on {target.description}: LoRA r={cfg.lora.r} ({cfg.lora.targets}), "
              f"{cfg.model.quantize}{'+DQ' if cfg.model.double_quant else ''}, compiled for the target")
    if _FIT.value:
        best, _ = fit(spec, target, devices, log=(lambda s: None) if _JSON.value else print)
        if best is None:
            raise PlanError(f"nothing fits {target.name} with mesh {spec.mesh} at seq {spec.seq}, even with "
                            f"remat full and one sequence per chip: shorten data.max_length or use more chips")
        per_chip = best.micro_batch // _batch_chips(spec.mesh)
        if _JSON.value:
            print(json.dumps(best.row()))
        else:
            print(f"pick: --config.model.remat={best.remat} --config.train.batch_size={best.micro_batch} "
                  f"({per_chip} per chip; raise --config.train.grad_accum for a larger global batch)")
        return
    m = measure(spec, target, devices)
    if _JSON.value:
        print(json.dumps(m.row()))
    else:
        print(_line(m, target))
    if _MIN_HBM.value and target.platform == "tpu" and m.fits:
        need = min_hbm_mib(sys.argv[1:], target)
        print(f"  smallest per-chip memory it compiles in: {need} MiB (--xla_tpu_max_hbm_size_mib bisection)")


def console() -> None:
    """``python -m qlora_jax.plan`` and the ``qlora-plan`` script."""
    # libtpu reads LIBTPU_INIT_ARGS once, at load; several compile-only processes may load it.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    define_flags()
    run_absl(main)
