"""python -m qlora_jax.inspect --config configs/sft.py [--config.model.source=PATH] [--config.lora.r=32]

Validates the config and prints :func:`qlora_jax.train.footprint.report` (nothing is loaded).
"""

from __future__ import annotations

from qlora_jax.cli._common import ConfigFlag, run_absl

_CONFIG = ConfigFlag("Path to a config file (configs/*.py).")


def main(argv):
    del argv
    from qlora_jax.train.config import validate_config
    from qlora_jax.train.footprint import report

    validate_config(_CONFIG.value)  # a value out of range: one line naming the key
    print(report(_CONFIG.value))


def console() -> None:
    """``python -m qlora_jax.inspect`` and the ``qlora-inspect`` script."""
    _CONFIG.define()
    run_absl(main)
