"""Test-wide setup: run JAX on the CPU with exact float32 matmuls, so parity tests can be tight.

Helpers the test files import live in ``_support.py`` (``REPO``, ``SHARED``, ``require`` for reference
libraries: a skip locally, a failure when ``CI`` is set), since a conftest is not meant to be imported.
"""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    """One persistent XLA compilation cache for the whole session: the xdist workers and every CLI
    subprocess a test starts inherit ``JAX_COMPILATION_CACHE_DIR``, so a program compiled once (the
    SmolLM2 step of the many CLI runs, the scoring and generation functions) is read back instead
    of compiled again (~13% of tests/test_smollm2.py + tests/test_generate.py, 2026-12-01). The
    cache lives in the session's temporary directory and goes with it: nothing carries over from
    one session to the next. Tests that set their own cache directory keep it."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller set the environment
        return
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        import tempfile

        os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="qlora_jax_xla_cache_")
        config._qlora_xla_cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def pytest_unconfigure(config):
    cache = getattr(config, "_qlora_xla_cache", None)
    if cache:
        import shutil

        shutil.rmtree(cache, ignore_errors=True)


# The slowest files first (from `make test`'s --durations, 2026-12-01), so that the two workers of
# `-n 2 --dist loadfile` (which hands out files in collection order) finish together instead of
# one running test_train.py alone at the end. Order within a file is kept.
SLOW_FIRST = ("test_train.py", "test_self_refine.py", "test_sharding.py", "test_grpo.py", "test_dpo.py",
              "test_tpu_compile.py", "test_generate.py", "test_gpu_compile.py", "test_multiprocess.py",
              "test_smollm2.py", "test_grpo_sampling.py", "test_checkpoints.py", "test_dora.py",
              "test_resume_objectives.py", "test_families.py", "test_gguf_families.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.path)).name, len(rank)))
