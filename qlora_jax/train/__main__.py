"""python -m qlora_jax.train --config configs/sft.py [--config.key=value ...]"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                          lock_config=True)


def main(argv):
    del argv
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
    from qlora_jax.distributed import maybe_initialize

    maybe_initialize()
    from qlora_jax.data import DataError
    from qlora_jax.train.checkpoint import CheckpointMismatch
    from qlora_jax.train.config_check import ConfigError
    from qlora_jax.train.loop import NonFiniteLoss
    from qlora_jax.train.run import run

    try:
        run(_CONFIG.value)
    except (ConfigError, FileNotFoundError, DataError, CheckpointMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main)
