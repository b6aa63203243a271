"""python -m qlora_jax.evaluate --config configs/eval_mcqa.py [--config.model.source=...]
    [--config.adapter=RUN_DIR/adapter] [--config.prompt.chat_template=True]

The evaluation is :func:`qlora_jax.inference.evaluate.run`.
"""

from __future__ import annotations

from qlora_jax.cli._common import ConfigFlag, run_absl

_CONFIG = ConfigFlag("Path to configs/eval_mcqa.py.")


def main(argv):
    del argv
    from qlora_jax.inference.evaluate import run

    run(_CONFIG.value)


def console() -> None:
    """``python -m qlora_jax.evaluate`` and the ``qlora-evaluate`` script."""
    _CONFIG.define()
    run_absl(main)
