"""``python -m qlora_jax.plan``: the command is :mod:`qlora_jax.cli.plan`; the library is :mod:`qlora_jax.train.aot`."""

from qlora_jax.cli.plan import console

if __name__ == "__main__":
    console()
