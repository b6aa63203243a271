"""python -m qlora_jax.pipelines.self_refine --config configs/self_refine.py[:demo] [--config.key=value]

The pipeline is :func:`qlora_jax.pipelines.refinement.run_pipeline`; a pipeline that stopped (or
waits for other shards) prints ``stopped: ...`` and exits with status 3.
"""

from __future__ import annotations

import sys

from qlora_jax.cli._common import ConfigFlag, run_absl

_CONFIG = ConfigFlag("Path to configs/self_refine.py (':demo' for the demo).")


def main(argv) -> None:
    del argv
    from qlora_jax.pipelines.refinement import PipelineStopped, WaitingForShards, run_pipeline

    try:
        run_pipeline(_CONFIG.value)
    except (PipelineStopped, WaitingForShards) as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(3)


def console() -> None:
    """``python -m qlora_jax.pipelines.self_refine`` and the ``qlora-self-refine`` script."""
    _CONFIG.define()
    run_absl(main)
