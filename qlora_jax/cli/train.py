"""python -m qlora_jax.train --config configs/sft.py [--config.key=value ...]

A bad flag, config key, config file or input ends with one "error: ..." line and exit status 2
(a run that diverged: 3); the run's train.log records it too.
"""

from __future__ import annotations

from qlora_jax.cli._common import ConfigFlag, run_absl

_CONFIG = ConfigFlag("Path to a config file (configs/*.py).")


def main(argv):
    del argv
    from qlora_jax.distributed import maybe_initialize

    maybe_initialize()
    from qlora_jax.train.trainer import run

    run(_CONFIG.value)


def console() -> None:
    """``python -m qlora_jax.train`` and the ``qlora-train`` script."""
    _CONFIG.define()
    run_absl(main)
