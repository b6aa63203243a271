"""Test-wide setup: run JAX on the CPU with exact float32 matmuls, so parity tests can be tight.

Helpers the test files import live in ``_support.py`` (``REPO``, ``SHARED``, ``require`` for reference
libraries: a skip locally, a failure when ``CI`` is set), since a conftest is not meant to be imported.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_default_matmul_precision", "highest")
