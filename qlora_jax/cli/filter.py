"""python -m qlora_jax.data.filter --config configs/filter.py [--config.key=value ...]

The selection is :func:`qlora_jax.data.selection.run`.
"""

from __future__ import annotations

import os

from qlora_jax.cli._common import ConfigFlag, run_absl
from qlora_jax.errors import UserError

_CONFIG = ConfigFlag("Path to configs/filter.py.")


def main(argv):
    del argv
    from qlora_jax.data.selection import run
    from qlora_jax.embed import EmbedError

    try:
        run(_CONFIG.value)
    except EmbedError as e:  # a missing or broken embedding model: one line too
        raise UserError(str(e)) from e


def console() -> None:
    """``python -m qlora_jax.data.filter`` and the ``qlora-filter`` script."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _CONFIG.define()
    run_absl(main)
