"""python -m qlora_jax.train --config configs/sft.py [--config.key=value ...]

A bad flag, config key, config file or input ends with one "error: ..." line and exit status 2
(a run that diverged: 3); the run's train.log records it too.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                          lock_config=True)


def main(argv):
    del argv
    from qlora_jax.distributed import maybe_initialize

    maybe_initialize()
    from qlora_jax.train.run import run

    run(_CONFIG.value)


if __name__ == "__main__":
    from qlora_jax.errors import run_absl

    flags.mark_flags_as_required(["config"])
    run_absl(main)
