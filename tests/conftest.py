"""Test-wide setup: run JAX on the CPU with exact float32 matmuls, so parity tests can be tight."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_default_matmul_precision", "highest")
