"""Training: mesh, jit'd step, optimizer, schedule, accumulation, logging, checkpoints.

Entry point: ``python -m qlora_jax.train --config configs/sft.py``.
"""
