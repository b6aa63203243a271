"""Multi-host start-up: ``jax.distributed.initialize`` when the environment asks for it.

Auto-detected on Cloud TPU VMs and under SLURM by JAX itself; explicit with the environment
variables ``QLORA_COORDINATOR`` (host:port), ``QLORA_NUM_PROCESSES`` and ``QLORA_PROCESS_ID``.
A single process on one machine initializes nothing.
"""

from __future__ import annotations

import os


def maybe_initialize() -> bool:
    import jax

    coord = os.environ.get("QLORA_COORDINATOR")
    if coord:
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
            # Cross-process collectives between CPU devices (tests, laptops) go through gloo.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coord,
            num_processes=int(os.environ["QLORA_NUM_PROCESSES"]),
            process_id=int(os.environ["QLORA_PROCESS_ID"]),
        )
        return True
    if os.environ.get("SLURM_NTASKS", "1") != "1" or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize()
        return True
    return False
